"""One-shot importance of heads and FFN neurons on a few batches, and one-shot structured pruning."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from ..structure import head_slots, neuron_slots, prune_ffn_neurons, prune_heads
from .base import get_unit_criterion, normalize_per_layer, score_units
from .selection import select_heads_to_prune, select_neurons_to_prune


def compute_head_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    normalize_layers: bool = True,
    method: str = "gradient",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Importance of every attention head, higher means keep.

    Args:
        model: a Transformers model of a registered layout (pruned or not).
        dataloader: an iterable of Trainer-style batches (dicts with `input_ids`, `attention_mask`, `labels`);
            without `labels`, the language-modelling loss on `input_ids` is used.
        normalize_layers: divide each layer's scores by their L2 norm (Michel et al.).
        method: "gradient" (expected |dL/d gate|), "activation" (mean norm of each head's output), "taylor" (|sum of
            W * dL/dW| over the head's columns), or a name registered with `register_unit_criterion`.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.

    Returns:
        float32 tensor [num_layers, num_heads] in the ORIGINAL head numbering, non-negative; removed heads score 0.
        The model runs in eval mode and gets its train/eval mode back; weights, `requires_grad` and `.grad` are
        left as they were.
    """
    slots = head_slots(model)
    criterion = get_unit_criterion(method, "compute_head_importance: method")
    rows = score_units(model, dataloader, slots, criterion, max_batches, "head importance", progress)
    width = max(slot.total for slot in slots)
    scores = torch.zeros(len(slots), width, dtype=torch.float32)
    for slot, row in zip(slots, rows):
        scores[slot.layer_idx, : slot.total] = row.cpu()
    return normalize_per_layer(scores) if normalize_layers else scores


def compute_neuron_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    normalize_layers: bool = True,
    method: str = "gradient",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Importance of every FFN neuron (gates on the input of the MLP down projection), higher means keep.

    Same arguments and guarantees as `compute_head_importance`. Returns {layer: float32 tensor [intermediate_size]}
    in the ORIGINAL neuron numbering; removed neurons score 0.
    """
    slots = neuron_slots(model)
    criterion = get_unit_criterion(method, "compute_neuron_importance: method")
    rows = score_units(model, dataloader, slots, criterion, max_batches, "neuron importance", progress)
    result = {}
    for slot, row in zip(slots, rows):
        row = row.cpu()
        result[slot.layer_idx] = normalize_per_layer(row[None])[0] if normalize_layers else row
    return result



def prune_structured(
    model: nn.Module,
    dataloader,
    head_sparsity: float = 0.0,
    neuron_sparsity: float = 0.0,
    method: str = "gradient",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> dict[str, dict[int, list[int]]]:
    """One-shot structured pruning of an already fine-tuned model: score, select across layers, remove.

    Scores heads and neurons on `dataloader` (`compute_head_importance` / `compute_neuron_importance`), removes the
    lowest `head_sparsity` of all heads and `neuron_sparsity` of all FFN neurons physically, in place. A short
    recovery fine-tune afterwards (a few hundred steps, ideally distilled from the unpruned model) wins back most of
    the loss (Kwon et al. 2022).

    Returns:
        {"heads": {layer: [original indices]}, "neurons": {layer: [original indices]}} that are gone.
    """
    for name, value in (("head_sparsity", head_sparsity), ("neuron_sparsity", neuron_sparsity)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"prune_structured: {name}={value!r} is invalid: a fraction must lie in [0, 1).")
    head_importance = neuron_importance = None
    if head_sparsity > 0:
        head_importance = compute_head_importance(model, dataloader, method=method, max_batches=max_batches,
                                                  progress=progress)
    if neuron_sparsity > 0:
        neuron_importance = compute_neuron_importance(model, dataloader, method=method, max_batches=max_batches,
                                                      progress=progress)
    return prune_by_importance(model, head_importance, neuron_importance, head_sparsity, neuron_sparsity)


def prune_by_importance(
    model: nn.Module,
    head_importance: Optional[torch.Tensor],
    neuron_importance: Optional[Mapping[int, torch.Tensor]],
    head_sparsity: float = 0.0,
    neuron_sparsity: float = 0.0,
) -> dict[str, dict[int, list[int]]]:
    """Remove the lowest `head_sparsity` of all heads and `neuron_sparsity` of all FFN neurons by scores computed
    earlier (`compute_head_importance` / `compute_neuron_importance`), in place.

    Scoring once and removing at several fractions from copies of the model gives candidates with exactly the
    shapes that pruning at each fraction would give (how `hf-prune optimize` times them before training).

    Returns:
        {"heads": {layer: [original indices]}, "neurons": {layer: [original indices]}} that are gone.
    """
    for name, value in (("head_sparsity", head_sparsity), ("neuron_sparsity", neuron_sparsity)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"prune_by_importance: {name}={value!r} is invalid: a fraction must lie in [0, 1).")
    heads: dict[int, list[int]] = {}
    neurons: dict[int, list[int]] = {}
    if head_sparsity > 0:
        if head_importance is None:
            raise ValueError("prune_by_importance: head_sparsity > 0 needs head_importance.")
        heads = select_heads_to_prune(head_importance, head_sparsity, model=model)
    if neuron_sparsity > 0:
        if neuron_importance is None:
            raise ValueError("prune_by_importance: neuron_sparsity > 0 needs neuron_importance.")
        neurons = select_neurons_to_prune(neuron_importance, neuron_sparsity, model=model)
    if heads:
        prune_heads(model, heads)
    if neurons:
        prune_ffn_neurons(model, neurons)
    return {"heads": heads, "neurons": neurons}
