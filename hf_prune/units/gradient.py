"""`gradient`: the expected |dL/d gate| of a per-example gate on each unit (Michel et al. 2019, "Are Sixteen Heads
Really Better than One?")."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..structure import UnitSlot
from .base import UnitCriterion, model_loss, register_unit_criterion


class GradientCriterion(UnitCriterion):
    needs_loss = True

    def hook(self, slot: UnitSlot, module: nn.Module, inputs: tuple, state: dict) -> Optional[tuple]:
        x = inputs[0]
        gate = torch.ones(x.shape[0], len(slot.kept), dtype=x.dtype, device=x.device, requires_grad=True)
        state["gates"][id(slot)] = gate
        scale = gate.repeat_interleave(slot.unit_width, dim=1)
        scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        return (x * scale,) + tuple(inputs[1:])

    def run_batch(self, model: nn.Module, batch: dict[str, Any], live: list[UnitSlot], state: dict, totals) -> None:
        state["gates"] = {}
        with torch.enable_grad():
            loss = model_loss(model, batch)
            gated = [slot for slot in live if id(slot) in state["gates"]]
            gates = [state["gates"][id(slot)] for slot in gated]
            grads = torch.autograd.grad(loss, gates, allow_unused=True) if gates else []
        for slot, grad in zip(gated, grads):
            if grad is not None:
                totals[slot.layer_idx][slot.kept] += grad.detach().abs().float().sum(dim=0)


register_unit_criterion("gradient", GradientCriterion)
