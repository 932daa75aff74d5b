"""Which hidden channels (width) and which layers (depth) to remove: the lowest-scoring ones along one axis, already
removed ones counted towards the target and always part of the result, so a growing target removes gradually and
the result can be passed to `prune_hidden` / `prune_layers` as it is (they ignore what is already gone)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..structure import structure_summary


def _scores_1d(importance: torch.Tensor, expected: Optional[int], name: str, what: str) -> torch.Tensor:
    scores = torch.as_tensor(importance).detach().float().cpu()
    if scores.dim() != 1:
        raise ValueError(f"{name}: importance must be one score per {what} (1-D), got shape {tuple(scores.shape)}.")
    if expected is not None and scores.numel() != expected:
        raise ValueError(
            f"{name}: importance has {scores.numel()} scores but the model has {expected} {what}s (original numbering)."
        )
    return scores


def _lowest(scores: torch.Tensor, already: set[int], count: int) -> list[int]:
    """`already` plus the lowest-scoring others until `count` are gone (ties: lower index first)."""
    live = [i for i in range(scores.numel()) if i not in already]
    live.sort(key=lambda i: (float(scores[i]), i))
    return sorted(already | set(live[: max(count - len(already), 0)]))


def _already(indices: Optional[Iterable[int]], total: int, name: str, what: str) -> set[int]:
    already = {int(i) for i in indices or ()}
    bad = sorted(i for i in already if not 0 <= i < total)
    if bad:
        raise ValueError(f"{name}: already_pruned={bad} are not {what}s 0 to {total - 1}.")
    return already


def select_channels_to_prune(
    importance: torch.Tensor,
    fraction: float,
    *,
    model: Optional[nn.Module] = None,
    already_pruned: Optional[Iterable[int]] = None,
    multiple_of: int = 1,
) -> list[int]:
    """The hidden channels to be gone so that `fraction` of the original hidden size is removed, lowest first.

    Args:
        importance: [original hidden size] from `compute_channel_importance`.
        fraction: target fraction of ALL original channels removed, already removed ones included; in [0, 1).
        model: when given, `already_pruned` defaults to the channels the model has lost, and `importance` is checked
            against its original hidden size.
        already_pruned: original indices of channels already removed (always part of the result).
        multiple_of: round the hidden size left to the nearest multiple of this (at least one multiple): matrix
            kernels run fastest on widths that are multiples of 8 or 64, and Transformers 5 wants Llama's hidden size
            to be a multiple of `num_attention_heads`.

    Returns:
        Sorted original channel indices, the complete set to be gone; pass it to `prune_hidden`.
    """
    name = "select_channels_to_prune"
    expected = None
    if model is not None:
        summary = structure_summary(model)
        expected = summary["original_hidden_size"]
        already_pruned = summary["pruned_hidden"] if already_pruned is None else already_pruned
    scores = _scores_1d(importance, expected, name, "hidden channel")
    total = scores.numel()
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{name}: fraction={fraction!r} is invalid: it must lie in [0, 1) (at least one channel stays).")
    if multiple_of < 1:
        raise ValueError(f"{name}: multiple_of={multiple_of!r} must be a positive integer.")
    keep = total - int(round(fraction * total))
    if multiple_of > 1:
        keep = min(total, max(multiple_of, multiple_of * int(round(keep / multiple_of))))
    return _lowest(scores, _already(already_pruned, total, name, "hidden channel"), total - max(keep, 1))


def select_layers_to_prune(
    importance: torch.Tensor,
    count: int,
    *,
    model: Optional[nn.Module] = None,
    already_pruned: Optional[Iterable[int]] = None,
) -> list[int]:
    """The `count` layers to be gone, lowest importance first, already removed ones included.

    Args:
        importance: [original number of layers] from `compute_layer_importance`.
        count: layers removed in total (already removed ones count), 0 to the original number of layers - 1.
        model: when given, `already_pruned` defaults to the layers the model has lost, and `importance` is checked
            against its original number of layers.
        already_pruned: original indices of layers already removed (always part of the result).

    Returns:
        Sorted original layer indices, the complete set to be gone; pass it to `prune_layers`.
    """
    name = "select_layers_to_prune"
    expected = None
    if model is not None:
        summary = structure_summary(model)
        expected = summary["original_num_layers"]
        already_pruned = summary["pruned_layers"] if already_pruned is None else already_pruned
    scores = _scores_1d(importance, expected, name, "layer")
    total = scores.numel()
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < total:
        raise ValueError(
            f"{name}: count={count!r} is invalid: it must be an integer from 0 to {total - 1} (at least one layer stays)."
        )
    return _lowest(scores, _already(already_pruned, total, name, "layer"), count)
