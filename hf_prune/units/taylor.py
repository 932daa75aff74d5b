"""`taylor`: first-order Taylor importance of each unit from its projection weights and their gradient
(Molchanov et al. 2019). The gradient of a gate on a unit equals sum over the unit's columns c and outputs o of
W[o, c] * dL/dW[o, c], so |that sum| is read off weights and gradients that a training step already has: it is the
criterion structured pruning during fine-tuning accumulates for free (`GradualUnitPruner`), and one-shot it needs one
backward per batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..linear import matrix_view
from ..structure import UnitSlot
from .base import UnitCriterion, loss_gradients, register_unit_criterion


def taylor_unit_scores(slot: UnitSlot, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|sum of W * dL/dW over each unit's input columns| of the slot's projection, one value per kept unit."""
    per_column = (matrix_view(slot.module, weight) * matrix_view(slot.module, grad)).sum(dim=0).float()
    return per_column.view(len(slot.kept), slot.unit_width).sum(dim=-1).abs()


class TaylorCriterion(UnitCriterion):
    needs_loss = True

    def run_batch(self, model: nn.Module, batch: dict[str, Any], live: list[UnitSlot], state: dict, totals) -> None:
        leaves = list({id(slot.leaf): slot.leaf for slot in live}.values())  # fused experts share one tensor
        grads = loss_gradients(model, batch, leaves)
        grad_of = {id(leaf): grad for leaf, grad in zip(leaves, grads)}
        for slot in live:
            grad = grad_of[id(slot.leaf)]
            if grad is not None:
                weight = slot.matrix_of(slot.leaf.detach())
                totals[slot.layer_idx][slot.kept] += taylor_unit_scores(slot, weight, slot.matrix_of(grad))


register_unit_criterion("taylor", TaylorCriterion)
