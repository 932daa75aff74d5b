"""Optimizer state of pruned weights."""

from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def clear_optimizer_state(
    optimizer: Optional[torch.optim.Optimizer], parameter: torch.Tensor, pruned: torch.Tensor
) -> None:
    """Zero the optimizer state (Adam moments, momentum) of the pruned entries of `parameter`, in place.

    Stale momentum would keep pushing a pruned weight away from zero; masking each step hides that, clearing it
    removes it. `pruned` is a boolean tensor of the parameter's shape or broadcastable to it (e.g. a column mask).
    State tensors of another shape (step counters) are left alone.
    """
    if optimizer is None:
        return
    for value in optimizer.state.get(parameter, {}).values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value.masked_fill_(pruned.to(value.device), 0.0)


@torch.no_grad()
def keep_optimizer_state(
    optimizer: Optional[torch.optim.Optimizer], parameters: list[torch.Tensor], keeps: list[torch.Tensor]
) -> None:
    """`clear_optimizer_state` for many parameters at once: every state tensor of `parameters[i]` is multiplied by
    `keeps[i]` (1 where kept, 0 where pruned, the parameter's shape) in one batched `torch._foreach_mul_`."""
    if optimizer is None:
        return
    states, factors = [], []
    for parameter, keep in zip(parameters, keeps):
        for value in optimizer.state.get(parameter, {}).values():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                states.append(value)
                factors.append(keep.to(device=value.device, dtype=value.dtype))
    if not states:
        return
    if len({(t.dtype, t.device) for t in states}) == 1:
        torch._foreach_mul_(states, factors)
    else:
        for state, factor in zip(states, factors):
            state.mul_(factor)
