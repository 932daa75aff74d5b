"""The protocol of structure importance criteria (heads and FFN neurons, hidden channels, layers), their tables of
registered criteria, and the scoring loop.

Weights and structures are two protocols, not one. A weight method (`hf_prune.methods.PruningMethod`) scores every
individual weight of the targeted layers and is built to live inside the optimizer loop: it reads the gradients of
each step, may own learnable scores, a loss term and checkpointed state, and its scores feed masks in a sparsity
pattern at scheduled steps (one-shot pruning drives the same class block by block). A structure criterion is one
call that scores whole structures from a few batches, in eval mode with the parameters frozen, and leaves selection
and physical removal to its caller; it has no step, no state between calls and no pattern. Each shape would leave
most of the other's hooks empty, so they stay apart and share only how they are registered
(`hf_prune.registry.Registry`: by name, as a call or a decorator). The three structure axes share the scoring mode
and the batch loop (`scoring_batches`) and differ only in the one call that scores, because each needs another view
of the model: unit criteria get the projection columns that carry the units (`UnitSlot`), channel criteria the
number of kept residual-stream channels, layer criteria the list of transformer layers.

A unit is an attention head (its `head_dim` input columns of the attention output projection) or an FFN neuron (one
input column of the MLP down projection). Criteria read those columns, so they need no `head_mask` (gone in
Transformers 5.x, never present in Llama-style models) and work on already pruned models. Units are named in the
layer's ORIGINAL numbering, as `prune_heads` and `prune_ffn_neurons` expect; units already removed score 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..registry import Registry
from ..structure import UnitSlot, expert_probes


class UnitCriterion:
    """Base class of a head/neuron importance criterion; register subclasses with `register_unit_criterion`.

    The scoring loop (`score_units`) runs the model on each batch with the parameters frozen and calls:
        `hook(slot, module, inputs, state)`: a forward pre-hook on each slot's projection; may return new inputs.
        `run_batch(model, batch, live_slots, state, totals)`: run the batch and add each live slot's per-unit
            scores (a tensor of len(slot.kept)) into `totals[slot.layer_idx][slot.kept]`.
    Live slots are matrices (`UnitSlot.pieces()`): several of them share a `layer_idx` in a mixture-of-experts layer,
    so per-slot state is keyed by `id(slot)`; their weights are `slot.matrix_of(slot.leaf)`.
    Class attribute `needs_loss`: whether batches must yield a loss (labels, or a language model).
    """

    name: ClassVar[str] = ""
    needs_loss: ClassVar[bool] = False

    def hook(self, slot: UnitSlot, module: nn.Module, inputs: tuple, state: dict) -> Optional[tuple]:
        return None

    def run_batch(
        self, model: nn.Module, batch: dict[str, Any], live: list[UnitSlot], state: dict, totals: list[torch.Tensor]
    ) -> None:
        raise NotImplementedError


class ChannelCriterion:
    """Base class of a hidden (residual-stream) channel importance criterion, for `compute_channel_importance`;
    register subclasses with `register_channel_criterion`.

    `score(model, batches, width)` gets the model in eval mode with its parameters frozen, the batches on its device
    (an iterator: read it once) and the number of channels the model has now; it returns a float32 tensor [width],
    the mean score of each kept channel over the batches, higher means keep. `compute_channel_importance` puts the
    scores in the ORIGINAL channel numbering. Class attribute `needs_loss`: whether batches must yield a loss.
    """

    name: ClassVar[str] = ""
    needs_loss: ClassVar[bool] = False

    def score(self, model: nn.Module, batches: Iterable[dict[str, Any]], width: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(model, batches, width).")


class LayerCriterion:
    """Base class of a transformer-layer importance criterion, for `compute_layer_importance`; register subclasses
    with `register_layer_criterion`.

    `score(model, layers, batches)` gets the model in eval mode with its parameters frozen, its present transformer
    layers (`hf_prune.structure.find_layers(model)[1]`) and the batches on its device (an iterator: read it once); it
    returns a float32 tensor [len(layers)], the mean score of each layer over the batches, higher means keep.
    `compute_layer_importance` puts the scores in the ORIGINAL layer numbering. Class attribute `needs_loss`: whether
    batches must yield a loss.
    """

    name: ClassVar[str] = ""
    needs_loss: ClassVar[bool] = False

    def score(self, model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict[str, Any]]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(model, layers, batches).")


UNIT_CRITERIA: Registry[type[UnitCriterion]] = Registry(
    UnitCriterion, "unit criterion", "unit criteria", "register_unit_criterion")
CHANNEL_CRITERIA: Registry[type[ChannelCriterion]] = Registry(
    ChannelCriterion, "channel criterion", "channel criteria", "register_channel_criterion")
LAYER_CRITERIA: Registry[type[LayerCriterion]] = Registry(
    LayerCriterion, "layer criterion", "layer criteria", "register_layer_criterion")


def register_unit_criterion(name: str, cls: Optional[type] = None, *, overwrite: bool = False):
    """Register a `UnitCriterion` subclass so `compute_head_importance(..., method=name)` uses it; as a call,
    `register_unit_criterion("mine", Mine)`, or a class decorator, `@register_unit_criterion("mine")`."""
    return UNIT_CRITERIA.register(name, cls, overwrite=overwrite)


def register_channel_criterion(name: str, cls: Optional[type] = None, *, overwrite: bool = False):
    """Register a `ChannelCriterion` subclass so `compute_channel_importance(..., method=name)` uses it; as a call
    or a class decorator, like `register_unit_criterion`."""
    return CHANNEL_CRITERIA.register(name, cls, overwrite=overwrite)


def register_layer_criterion(name: str, cls: Optional[type] = None, *, overwrite: bool = False):
    """Register a `LayerCriterion` subclass so `compute_layer_importance(..., method=name)` uses it; as a call or a
    class decorator, like `register_unit_criterion`."""
    return LAYER_CRITERIA.register(name, cls, overwrite=overwrite)


def unregister_unit_criterion(name: str) -> None:
    """Remove a registered unit criterion (for tests and plugins that register temporarily)."""
    UNIT_CRITERIA.unregister(name)


def unregister_channel_criterion(name: str) -> None:
    """Remove a registered channel criterion (for tests and plugins that register temporarily)."""
    CHANNEL_CRITERIA.unregister(name)


def unregister_layer_criterion(name: str) -> None:
    """Remove a registered layer criterion (for tests and plugins that register temporarily)."""
    LAYER_CRITERIA.unregister(name)


def available_unit_criteria() -> tuple[str, ...]:
    """Names of the registered head/neuron importance criteria."""
    return UNIT_CRITERIA.names()


def available_channel_criteria() -> tuple[str, ...]:
    """Names of the registered hidden-channel importance criteria."""
    return CHANNEL_CRITERIA.names()


def available_layer_criteria() -> tuple[str, ...]:
    """Names of the registered layer importance criteria."""
    return LAYER_CRITERIA.names()


def get_unit_criterion(name: str, option: str = "method") -> UnitCriterion:
    """A new instance of the unit criterion registered under `name`; a ValueError naming `option` otherwise."""
    return UNIT_CRITERIA.get(name, option)()


def get_channel_criterion(name: str, option: str = "method") -> ChannelCriterion:
    """A new instance of the channel criterion registered under `name`; a ValueError naming `option` otherwise."""
    return CHANNEL_CRITERIA.get(name, option)()


def get_layer_criterion(name: str, option: str = "method") -> LayerCriterion:
    """A new instance of the layer criterion registered under `name`; a ValueError naming `option` otherwise."""
    return LAYER_CRITERIA.get(name, option)()


def check_scores(criterion: object, scores: Any, expected: int, what: str) -> None:
    """Raise a TypeError naming a (user-registered) criterion whose `score` returned no tensor of one value per
    structure, rather than a shape error deep inside indexing."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (expected,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise TypeError(
            f"hf_prune: {type(criterion).__name__}.score returned {shape}; it must return a tensor of shape "
            f"({expected},), one score per {what}."
        )


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's loss on a Trainer-style batch; causal language models without labels predict their input ids."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "labels" not in batch and "input_ids" in batch and type(model).__name__ in set(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    ):
        batch = {**batch, "labels": batch["input_ids"]}
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None) if not isinstance(outputs, dict) else outputs.get("loss")
    if loss is None:
        raise ValueError(
            f"hf_prune: {type(model).__name__} returned no loss for a batch with keys {sorted(batch)}; this importance "
            "method needs batches with `labels` (or a language model, which uses labels=input_ids). "
            "method='activation' needs no loss."
        )
    return loss


def loss_gradients(model: nn.Module, batch: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> list:
    """d loss / d tensor for each of `tensors` (None where the loss does not reach it), without touching `.grad`.

    The tensors are made to require gradients for this one backward pass only and get their flag back afterwards,
    also on errors, so scoring a frozen model (`scoring_mode`) or a training one leaves it as it was.
    """
    flags = [t.requires_grad for t in tensors]
    try:
        for tensor in tensors:
            tensor.requires_grad_(True)
        with torch.enable_grad():
            return list(torch.autograd.grad(model_loss(model, dict(batch)), list(tensors), allow_unused=True))
    finally:
        for tensor, flag in zip(tensors, flags):
            tensor.requires_grad_(flag)


def normalize_per_layer(scores: torch.Tensor) -> torch.Tensor:
    """Divide each row (a layer's units) by its L2 norm, as in Michel et al.'s code, so layers compare on one scale."""
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-20)


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with every parameter frozen (no `.grad` is created or changed) while scoring; train/eval mode and
    `requires_grad` are restored afterwards, also on errors."""
    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag


def scoring_batches(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    max_batches: Optional[int],
    description: str,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    """The first `max_batches` batches of `dataloader` on the model's device, with a tqdm bar; raises a ValueError
    when there is none."""
    device = next(model.parameters()).device
    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    batches = 0
    for batch in tqdm(dataloader, total=total, desc=description, disable=not progress):
        if max_batches is not None and batches >= max_batches:
            break
        batches += 1
        yield move_batch(batch, device)
    if batches == 0:
        raise ValueError("hf_prune: the dataloader yielded no batches; importance needs at least one.")


def token_mask(batch: Mapping[str, Any], shape: torch.Size) -> Optional[torch.Tensor]:
    """The batch's attention mask as float (batch, tokens) when it matches `shape`, else None (every token counts)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(shape):
        return mask.float()
    return None


def score_units(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    slots: list[UnitSlot],
    criterion: UnitCriterion,
    max_batches: Optional[int],
    description: str,
    progress: bool,
) -> list[torch.Tensor]:
    """Per slot, a score per ORIGINAL unit (0 for removed units), summed over batches then averaged.

    The model runs in eval mode with every parameter frozen (no `.grad` is created or changed); train/eval mode and
    `requires_grad` are restored afterwards.
    """
    device = next(model.parameters()).device
    totals = {slot.layer_idx: torch.zeros(slot.total, dtype=torch.float32, device=device) for slot in slots}
    live = [piece for slot in slots for piece in slot.pieces() if piece.module is not None]
    state: dict[str, Any] = {}

    def make_hook(slot: UnitSlot):
        return lambda module, args: criterion.hook(slot, module, args, state)

    handles = [slot.module.register_forward_pre_hook(make_hook(slot)) for slot in live]
    batches = 0
    try:
        with scoring_mode(model), expert_probes(live):
            for batch in scoring_batches(model, dataloader, max_batches, description, progress):
                criterion.run_batch(model, batch, live, state, totals)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    return [totals[slot.layer_idx] / batches for slot in slots]
