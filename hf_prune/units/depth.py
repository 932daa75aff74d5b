"""Importance of whole transformer layers, for depth pruning with `hf_prune.structure.prune_layers`.

`block_influence` (ShortGPT, Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect"; one of the depth criteria of Minitron, Muralidharan et al. 2024): 1 - the cosine similarity between a
layer's input and output hidden states, averaged over tokens. A layer that barely changes the hidden states scores
near 0 and can go. One forward pass per batch.

`loss` (Minitron's depth criterion): how much the loss rises when the layer is skipped (its output replaced by its
input), which is exactly what removing it does. One forward pass per layer per batch, plus one.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..structure import find_layers, original_layer_indices, structure_summary
from .base import (
    LayerCriterion,
    check_scores,
    get_layer_criterion,
    model_loss,
    register_layer_criterion,
    scoring_batches,
    scoring_mode,
    token_mask,
)


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a transformer layer was called with (first positional argument or a known keyword)."""
    if args:
        return args[0]
    for key in ("hidden_states", "x", "hidden_state"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    raise TypeError("hf_prune: a transformer layer was called without hidden states.")


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a transformer layer returned (Transformers layers return a tensor or a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@register_layer_criterion("block_influence")
class BlockInfluence(LayerCriterion):
    """ShortGPT: 1 - cos(layer input, layer output), averaged over tokens; one forward pass per batch."""

    def score(self, model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict[str, Any]]) -> torch.Tensor:
        device = next(model.parameters()).device
        total = torch.zeros(len(layers), dtype=torch.float32, device=device)
        state: dict[str, Any] = {}

        def make_hook(i: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                x, y = layer_input(args, kwargs).detach().float(), layer_output(output).detach().float()
                cosine = F.cosine_similarity(x, y, dim=-1)  # (batch, tokens)
                mask = token_mask(state["batch"], cosine.shape) if cosine.dim() == 2 else None
                if mask is None:
                    similarity = cosine.mean()
                else:
                    similarity = (cosine * mask).sum() / mask.sum().clamp_min(1)
                state["scores"][i] = 1.0 - similarity

            return hook

        handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        count = 0
        try:
            for batch in batches:
                state["batch"] = batch
                state["scores"] = torch.zeros(len(layers), dtype=torch.float32, device=device)
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                total += state["scores"]
                count += 1
        finally:
            for handle in handles:
                handle.remove()
        return total / max(count, 1)


def _skip(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook that makes a layer the identity (what removing it does)."""
    x = layer_input(args, kwargs)
    return (x, *output[1:]) if isinstance(output, tuple) else x


@register_layer_criterion("loss")
class LossIncrease(LayerCriterion):
    """Minitron: the loss with the layer skipped minus the loss of the model; one forward pass per layer per batch,
    plus one."""

    needs_loss = True

    def score(self, model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict[str, Any]]) -> torch.Tensor:
        total = torch.zeros(len(layers), dtype=torch.float32)
        count = 0
        for batch in batches:
            with torch.no_grad():
                base = float(model_loss(model, batch))
                for i, layer in enumerate(layers):
                    handle = layer.register_forward_hook(_skip, with_kwargs=True)
                    try:
                        total[i] += float(model_loss(model, batch)) - base
                    finally:
                        handle.remove()
            count += 1
        return total / max(count, 1)


def compute_layer_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    method: str = "block_influence",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Importance of every transformer layer, higher means keep.

    Args:
        model: a Transformers model of a registered layout, pruned or not.
        dataloader: Trainer-style batches; `loss` needs `labels` unless the model is a causal LM. Padding tokens
            (attention mask 0) do not count for `block_influence`.
        method: "block_influence" (1 - cos(layer input, layer output), ShortGPT), "loss" (loss with the layer
            skipped minus the loss of the model; negative when skipping it helps), or a name registered with
            `register_layer_criterion`.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.

    Returns:
        float32 tensor [original number of layers] in the ORIGINAL layer numbering (what `prune_layers` takes);
        removed layers score 0. The model gets its train/eval mode, `requires_grad` and `.grad` back unchanged.
    """
    criterion = get_layer_criterion(method, "compute_layer_importance: method")
    _, layers = find_layers(model)
    kept = original_layer_indices(model)
    original = structure_summary(model)["original_num_layers"]
    with scoring_mode(model):
        batches = scoring_batches(model, dataloader, max_batches, "layer importance", progress)
        scores = criterion.score(model, layers, batches)
    check_scores(criterion, scores, len(layers), "present layer")
    result = torch.zeros(original, dtype=torch.float32)
    result[kept] = scores.cpu()
    return result
