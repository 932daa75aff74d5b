"""Experts of mixture-of-experts layers as pruning units: how much of the routing each one receives, and which go.

The importance of an expert is the mean router probability it receives over the calibration tokens (padding
excluded): an expert the router rarely picks, and gives little weight when it does, changes few outputs when it is
removed, the criterion of expert-pruning studies of Mixtral (Lu et al. 2024, "Not All Experts are Equal", use the
routing frequency; the mean probability also weighs how strongly each token is routed).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from ..structure import find_layers, prune_experts
from ..structure.layout import kept_experts_of, pruned_experts_of
from ..structure.paths import get_module
from .base import scoring_batches, scoring_mode, token_mask


def compute_expert_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """{layer: mean router probability of each expert, ORIGINAL numbering (0 for removed experts)}, MoE layers only.

    Batches are Trainer-style dicts (`input_ids`, `attention_mask`); no labels or backward pass are needed.
    """
    _, layers = find_layers(model)
    moe_layers = [i for i in range(len(layers)) if layers.layout(i).moe is not None]
    if not moe_layers:
        raise ValueError(f"hf_prune: {type(model).__name__} has no mixture-of-experts layer to score experts in.")
    totals = {i: torch.zeros(len(kept_experts_of(layers.layout(i).moe, layers[i]))) for i in moe_layers}
    state: dict[str, Any] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            logits = output[0] if isinstance(output, tuple) else output  # 5.x routers return (logits, ...)
            probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
            mask = state.get("mask")
            if mask is not None and mask.numel() == probs.shape[0]:
                probs = probs * mask.reshape(-1, 1)
            totals[i] += probs.sum(0).cpu()
        return hook

    handles = [get_module(layers[i], layers.layout(i).moe.router).register_forward_hook(make_hook(i))
               for i in moe_layers]
    tokens = 0.0
    try:
        with scoring_mode(model), torch.no_grad():
            for batch in scoring_batches(model, dataloader, max_batches, "expert importance", progress):
                ids = batch.get("input_ids")
                mask = token_mask(batch, ids.shape) if isinstance(ids, torch.Tensor) else None
                state["mask"] = mask
                tokens += float(mask.sum()) if mask is not None else float(ids.numel())
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for i in moe_layers:
        moe = layers.layout(i).moe
        kept = kept_experts_of(moe, layers[i])
        row = torch.zeros(len(kept) + len(pruned_experts_of(moe, layers[i])))
        row[kept] = totals[i] / max(tokens, 1.0)
        scores[i] = row
    return scores


def select_experts_to_prune(scores: Mapping[int, torch.Tensor], per_layer: int) -> dict[int, list[int]]:
    """The `per_layer` lowest-scoring experts still present in each layer (ORIGINAL numbering)."""
    if per_layer < 0:
        raise ValueError(f"hf_prune: per_layer={per_layer} must be >= 0.")
    chosen = {}
    for layer, row in scores.items():
        present = [e for e in range(len(row)) if row[e] > 0]
        ranked = sorted(present, key=lambda e: (float(row[e]), e))
        chosen[layer] = sorted(ranked[:per_layer])
    return {layer: experts for layer, experts in chosen.items() if experts}


def prune_experts_by_importance(
    model: nn.Module, dataloader: Iterable[Mapping[str, Any]], per_layer: int, max_batches: Optional[int] = None,
    progress: bool = True,
) -> dict[int, list[int]]:
    """Score the experts on a few batches and remove the `per_layer` least routed ones in every MoE layer."""
    chosen = select_experts_to_prune(compute_expert_importance(model, dataloader, max_batches, progress), per_layer)
    prune_experts(model, chosen)
    return chosen
