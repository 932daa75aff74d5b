"""The protocol of a weight-pruning criterion, and the table of registered ones.

A criterion answers one question -- which weights of a layer matter -- and may need a little machinery for it:
gradients read after every backward pass (movement), learnable scores that the optimizer steps and a loss term
(soft movement). `Pruner` owns everything else (schedule, patterns, masks, exact top-k, checkpoints), so a new
criterion is one small class in one file plus one `register_method` line, and it then works in `PruningTrainer`,
in the plain callbacks and from `PruningConfig(method=...)` with no other change (the way peft registers its tuners).
Criteria that score whole structures (heads, neurons, hidden channels, layers) are the other protocol, in
`hf_prune.units.base`, whose docstring says why there are two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import torch
from torch import nn

from ..registry import Registry

if TYPE_CHECKING:  # config imports this module to validate `method`; the reverse import is for type hints only
    from ..config import PruningConfig


class PruningMethod:
    """Base class of a pruning criterion. Subclass it, override what the criterion needs, and register it.

    Life cycle, driven by `Pruner`:

    1. `__init__(config)` once per `Pruner`; `validate_config(config)` runs earlier, when `PruningConfig` is built.
    2. `attach(modules)` with the targeted layers ({qualified name: nn.Linear or Conv1D}): allocate state here.
    3. Every optimizer step, when `needs_gradients` is True: `on_gradients(names, weights, grads)` with the complete
       gradients (after accumulation, before clipping and masking). Lists are aligned; only modules that received a
       gradient are passed. Use batched `torch._foreach_*` ops: this runs on every step.
    4. `after_optimizer_step()` once the optimizer has stepped (e.g. to clear gradients of learned scores).
    5. At each scheduled pruning step: `scores(name, module)` for every targeted layer -- a float tensor of the
       weight's stored shape, higher means keep. Pruned weights are ranked last by `Pruner` whatever they score.
    6. Right after those masks are chosen, before the newly pruned weights are zeroed: `on_masks_updated(name,
       module, newly_pruned)` once per targeted layer (criteria that update the kept weights, e.g. OBS).

    One-shot pruning (`hf_prune.oneshot`, no training) drives the same class block by block: `attach` with one
    block's layers, `observe(name, inputs)` for every calibration batch those layers see (when `needs_inputs`), then
    `prune_module(name, module, sparsity)` once per layer, then `detach(name)` to free what was collected.

    Class attributes:
        requires_trainer: the criterion adds a loss term or learnable parameters, which only `PruningTrainer` can
            wire in (a plain `Trainer` with `PruningCallback` then refuses it with a message that says so).
        needs_gradients: whether `on_gradients` must run every step.
        needs_inputs: whether `observe` must see each targeted layer's input activations (Wanda's norms,
            SparseGPT's Hessian). `Pruner` then hooks the layers' forward passes in training mode.
        one_shot_only: the criterion prunes once from calibration data and updates the kept weights (SparseGPT);
            `Pruner` refuses it and points to `hf_prune.oneshot`.
        fixed_masks: the criterion keeps the zeros the model already has and prunes nothing new (recovery
            fine-tuning after one-shot pruning); `Pruner` takes its masks from the weights and never recomputes them.
        comparison_group: for one-shot selection from `scores`: "layer" or "row" (each output row on its own).
    """

    name: ClassVar[str] = ""
    requires_trainer: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    one_shot_only: ClassVar[bool] = False
    fixed_masks: ClassVar[bool] = False
    # One-shot only: where scores are compared. "layer": all weights of a layer (magnitude); "row": the weights of
    # each output row (Wanda: per-output comparison is what keeps its accuracy at 50% on LLMs).
    comparison_group: ClassVar[str] = "layer"

    def __init__(self, config: "PruningConfig") -> None:
        self.config = config
        self.modules: dict[str, nn.Module] = {}

    @classmethod
    def validate_config(cls, config: "PruningConfig") -> None:
        """Raise ValueError (naming the option, the value and what is allowed) for settings this criterion rejects."""

    def attach(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    def on_gradients(self, names: Sequence[str], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Read the complete gradients of one optimizer step (only called when `needs_gradients`)."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step."""

    def on_masks_updated(self, name: str, module: nn.Module, newly_pruned: torch.Tensor) -> None:
        """Called once per module right after `Pruner` recomputed the masks at a scheduled step, with the boolean
        mask (the weight's stored layout, True = pruned) of the weights pruned at this step and not before, while
        they still hold their values: they are zeroed right after this returns. A criterion may change the kept
        weights of `module` here (OBS compensates the pruned ones); the default does nothing."""

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        """Importance of every weight of `module` in its stored layout, float32; higher means keep."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores(name, module).")

    def parameters(self) -> list[nn.Parameter]:
        """Learnable tensors the optimizer must step (their learning rate: `PruningConfig.score_learning_rate`)."""
        return []

    def loss(self) -> Optional[torch.Tensor]:
        """A term `PruningTrainer` adds to the training loss, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this criterion exactly (tensors on any device)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    # ------------------------------------------------------------------------------------------- one-shot
    def observe(self, name: str, inputs: torch.Tensor) -> None:
        """Accumulate statistics of one batch of `name`'s input activations, (..., in_features) (when
        `needs_inputs`)."""

    def prune_module(self, name: str, module: nn.Module, sparsity: float) -> torch.Tensor:
        """One-shot criteria that update the kept weights (`one_shot_only`, e.g. SparseGPT) prune `module` here to
        `sparsity` in the config's pattern, in place, and return the mask (True = pruned, the weight's stored
        layout). Other criteria leave selection to the one-shot engine, which ranks their `scores` within each
        `comparison_group`."""
        raise NotImplementedError(f"{type(self).__name__} leaves selection to the engine (it is not one_shot_only).")

    def detach(self, name: str) -> None:
        """Free what was collected for `name` (one-shot: its block is done)."""


def input_observer(method: PruningMethod, name: str, training_only: bool = False):
    """A forward pre-hook that shows layer `name`'s input activations to `method.observe` (with `training_only`, only
    in training mode: evaluation batches are not training statistics)."""

    def hook(module: nn.Module, args: tuple) -> None:
        if args and (module.training or not training_only):
            method.observe(name, args[0])

    return hook


METHODS: Registry[type[PruningMethod]] = Registry(PruningMethod, "method", "methods", "register_method")


def register_method(name: str, cls: Optional[type] = None, *, overwrite: bool = False):
    """Register a `PruningMethod` subclass under `name`, so `PruningConfig(method=name)` selects it.

    Works as a call, `register_method("taylor", TaylorMethod)`, or as a class decorator, `@register_method("taylor")`.
    Re-registering a name raises unless `overwrite=True`. Returns the class (the decorator without `cls`).
    """
    return METHODS.register(name, cls, overwrite=overwrite)


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and plugins that register temporarily)."""
    METHODS.unregister(name)


def available_methods() -> tuple[str, ...]:
    """Names of the registered pruning methods, in registration order."""
    return METHODS.names()


def get_method(name: str) -> type[PruningMethod]:
    """The class registered under `name`; ValueError naming the registered ones otherwise. To resolve a config's
    method, call `PruningConfig.method_class()`."""
    return METHODS.get(name, "PruningConfig.method")


def same_dtype(*lists: list[torch.Tensor]) -> bool:
    """Whether batched `torch._foreach_*` ops can take these lists (one dtype and one device throughout)."""
    tensors = [t for group in lists for t in group]
    return len({(t.dtype, t.device) for t in tensors}) <= 1
