"""The protocol of a head / FFN-neuron importance criterion, the table of registered ones, and the scoring loop.

A unit is an attention head (its `head_dim` input columns of the attention output projection) or an FFN neuron (one
input column of the MLP down projection). Criteria read those columns, so they need no `head_mask` (gone in
Transformers 5.x, never present in Llama-style models) and work on already pruned models. Units are named in the
layer's ORIGINAL numbering, as `prune_heads` and `prune_ffn_neurons` expect; units already removed score 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

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


_REGISTRY: dict[str, type[UnitCriterion]] = {}


def register_unit_criterion(name: str, cls: type, *, overwrite: bool = False) -> type:
    """Register a `UnitCriterion` subclass so `compute_head_importance(..., method=name)` uses it."""
    if not (isinstance(cls, type) and issubclass(cls, UnitCriterion)):
        raise TypeError(f"register_unit_criterion({name!r}, ...) takes a UnitCriterion subclass, got {cls!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls and not overwrite:
        raise ValueError(f"A unit criterion named {name!r} is already registered; pass overwrite=True to replace it.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def unregister_unit_criterion(name: str) -> None:
    """Remove a registered unit criterion (for tests and plugins that register temporarily)."""
    _REGISTRY.pop(name, None)


def available_unit_criteria() -> tuple[str, ...]:
    """Names of the registered head/neuron importance criteria."""
    return tuple(_REGISTRY)


def get_unit_criterion(name: str) -> UnitCriterion:
    if name not in _REGISTRY:
        raise ValueError(
            f"hf_prune: importance method={name!r} is not registered; choose one of {list(available_unit_criteria())}."
        )
    return _REGISTRY[name]()


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
