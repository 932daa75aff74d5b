"""Importance of hidden (residual-stream) channels, for width pruning with `hf_prune.structure.prune_hidden`.

`activation` is Minitron's criterion for the embedding (hidden) dimension (Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation", Sec. 2.2): the magnitude of each channel in the outputs of
the LayerNorms over the residual stream, averaged over the tokens of a small calibration set and summed over the
norms; forward passes only. `taylor` is the first-order Taylor estimate of the loss change when a channel is removed
(Molchanov et al. 2019): |sum of param * grad| over every parameter slice that writes the channel (embedding
columns, output-projection rows and biases, norm weights and biases), i.e. the gradient of a gate that scales the
channel; one backward pass per batch.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from ..structure import hidden_channel_parameters, hidden_norms, structure_summary
from .base import (
    ChannelCriterion,
    check_scores,
    get_channel_criterion,
    loss_gradients,
    register_channel_criterion,
    scoring_batches,
    scoring_mode,
    token_mask,
)


def _kept_channels(model: nn.Module) -> tuple[list[int], int]:
    summary = structure_summary(model)
    pruned = set(summary["pruned_hidden"])
    original = summary["original_hidden_size"]
    return [c for c in range(original) if c not in pruned], original


@register_channel_criterion("activation")
class ActivationChannels(ChannelCriterion):
    """Minitron: mean |LayerNorm output| per channel, summed over the residual-stream norms; forward passes only."""

    def score(self, model: nn.Module, batches: Iterable[dict[str, Any]], width: int) -> torch.Tensor:
        device = next(model.parameters()).device
        total = torch.zeros(width, dtype=torch.float32, device=device)
        state: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = (output[0] if isinstance(output, tuple) else output).detach().float().abs()
            mask = token_mask(state["batch"], y.shape[:2]) if y.dim() == 3 else None
            if mask is not None:
                per_channel = (y * mask[..., None]).sum(dim=(0, 1)) / mask.sum().clamp_min(1)
            else:
                per_channel = y.reshape(-1, y.shape[-1]).mean(dim=0)
            state["sums"] += per_channel

        handles = [module.register_forward_hook(hook) for _, module in hidden_norms(model)]
        count = 0
        try:
            for batch in batches:
                state["batch"] = batch
                state["sums"] = torch.zeros(width, dtype=torch.float32, device=device)
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                total += state["sums"]
                count += 1
        finally:
            for handle in handles:
                handle.remove()
        return total / max(count, 1)


@register_channel_criterion("taylor")
class TaylorChannels(ChannelCriterion):
    """|d loss / d channel gate|: |sum of param * grad| over every parameter slice that writes the channel; one
    backward pass per batch."""

    needs_loss = True

    def score(self, model: nn.Module, batches: Iterable[dict[str, Any]], width: int) -> torch.Tensor:
        params = hidden_channel_parameters(model)
        device = next(model.parameters()).device
        total = torch.zeros(width, dtype=torch.float32, device=device)
        count = 0
        for batch in batches:
            grads = loss_gradients(model, batch, [param for _, param, _ in params])
            gate_grad = torch.zeros(width, dtype=torch.float32, device=device)
            for (_, param, dim), grad in zip(params, grads):
                if grad is None:
                    continue
                product = (param.detach().float() * grad.float()).movedim(dim, 0)
                gate_grad += product.reshape(width, -1).sum(dim=1)
            total += gate_grad.abs()
            count += 1
        return total / max(count, 1)


def compute_channel_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    method: str = "activation",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Importance of every hidden channel, higher means keep.

    Args:
        model: a model `prune_hidden` supports (BERT, RoBERTa, DistilBERT, GPT-2, Llama-style), pruned or not.
        dataloader: Trainer-style batches (`input_ids`, `attention_mask`, and `labels` for `taylor` unless the model
            is a causal LM, which predicts its input ids). Padding tokens (attention mask 0) do not count.
        method: "activation" (Minitron: mean |LayerNorm output| per channel, summed over the residual-stream norms),
            "taylor" (|d loss / d channel gate|, one backward pass per batch), or a name registered with
            `register_channel_criterion`.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.

    Returns:
        float32 tensor [original hidden size] in the ORIGINAL channel numbering (what `prune_hidden` takes); removed
        channels score 0. The model gets its train/eval mode, `requires_grad` and `.grad` back unchanged.
    """
    criterion = get_channel_criterion(method, "compute_channel_importance: method")
    kept, original = _kept_channels(model)
    with scoring_mode(model):
        batches = scoring_batches(model, dataloader, max_batches, "channel importance", progress)
        scores = criterion.score(model, batches, len(kept))
    check_scores(criterion, scores, len(kept), "kept channel")
    result = torch.zeros(original, dtype=torch.float32)
    result[kept] = scores.cpu()
    return result
