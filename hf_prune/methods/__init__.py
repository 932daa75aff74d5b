"""Weight-pruning criteria, one file each, registered by name (`PruningConfig(method=name)`).

    from hf_prune import PruningMethod, register_method

    @register_method("my_criterion")
    class MyCriterion(PruningMethod):
        def scores(self, name, module):
            return module.weight.detach().abs().float()

Built in: `magnitude`, `movement`, `soft_movement`, `obs` (second order, oBERT), `wanda`, `constant` (keep existing
zeros), and the one-shot-only `sparsegpt`.
"""

from .base import PruningMethod, available_methods, get_method, register_method, unregister_method
# Registration order is the order `available_methods()` lists them in.
from . import magnitude, movement, soft_movement, obs  # noqa: F401, I001
from . import wanda, sparsegpt, constant  # noqa: F401, I001

__all__ = ["PruningMethod", "available_methods", "get_method", "register_method", "unregister_method"]
