"""Weight-pruning criteria, one file each, registered by name (`PruningConfig(method=name)`).

    from hf_prune import PruningMethod, register_method

    @register_method("my_criterion")
    class MyCriterion(PruningMethod):
        def scores(self, name, module):
            return module.weight.detach().abs().float()

Built in: `magnitude`, `movement`, `soft_movement`.
"""

from .base import PruningMethod, available_methods, get_method, register_method, unregister_method
from . import magnitude, movement, soft_movement  # noqa: F401  (registers the built-in methods)

__all__ = ["PruningMethod", "available_methods", "get_method", "register_method", "unregister_method"]
