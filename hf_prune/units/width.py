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

from typing import Any, Iterable, Literal, Mapping, Optional

import torch
from torch import nn

from ..structure import hidden_channel_parameters, hidden_norms, structure_summary
from .base import model_loss, scoring_batches, scoring_mode, token_mask

CHANNEL_METHODS = ("activation", "taylor")


def _kept_channels(model: nn.Module) -> tuple[list[int], int]:
    summary = structure_summary(model)
    pruned = set(summary["pruned_hidden"])
    original = summary["original_hidden_size"]
    return [c for c in range(original) if c not in pruned], original


def _activation_scores(model: nn.Module, batches: Iterable[dict[str, Any]], width: int) -> tuple[torch.Tensor, int]:
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
    return total, count


def _taylor_scores(model: nn.Module, batches: Iterable[dict[str, Any]], width: int) -> tuple[torch.Tensor, int]:
    params = hidden_channel_parameters(model)
    device = next(model.parameters()).device
    total = torch.zeros(width, dtype=torch.float32, device=device)
    count = 0
    for batch in batches:
        tensors = [param for _, param, _ in params]
        for tensor in tensors:
            tensor.requires_grad_(True)
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(model_loss(model, batch), tensors, allow_unused=True)
        finally:
            for tensor in tensors:
                tensor.requires_grad_(False)
        gate_grad = torch.zeros(width, dtype=torch.float32, device=device)
        for (_, param, dim), grad in zip(params, grads):
            if grad is None:
                continue
            product = (param.detach().float() * grad.float()).movedim(dim, 0)
            gate_grad += product.reshape(width, -1).sum(dim=1)
        total += gate_grad.abs()
        count += 1
    return total, count


def compute_channel_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    method: Literal["activation", "taylor"] = "activation",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Importance of every hidden channel, higher means keep.

    Args:
        model: a model `prune_hidden` supports (BERT, RoBERTa, DistilBERT, GPT-2, Llama-style), pruned or not.
        dataloader: Trainer-style batches (`input_ids`, `attention_mask`, and `labels` for `taylor` unless the model
            is a causal LM, which predicts its input ids). Padding tokens (attention mask 0) do not count.
        method: "activation" (Minitron: mean |LayerNorm output| per channel, summed over the residual-stream norms)
            or "taylor" (|d loss / d channel gate|, one backward pass per batch).
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.

    Returns:
        float32 tensor [original hidden size] in the ORIGINAL channel numbering (what `prune_hidden` takes); removed
        channels score 0. The model gets its train/eval mode, `requires_grad` and `.grad` back unchanged.
    """
    if method not in CHANNEL_METHODS:
        raise ValueError(f"compute_channel_importance: method={method!r} is not supported; choose one of {list(CHANNEL_METHODS)}.")
    kept, original = _kept_channels(model)
    with scoring_mode(model):
        batches = scoring_batches(model, dataloader, max_batches, "channel importance", progress)
        score = _activation_scores if method == "activation" else _taylor_scores
        total, count = score(model, batches, len(kept))
    result = torch.zeros(original, dtype=torch.float32)
    result[kept] = (total / max(count, 1)).cpu()
    return result
