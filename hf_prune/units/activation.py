"""`activation`: no backward pass; the mean over tokens of the L2 norm of what each unit adds to the block output.

A head's context slice goes through its columns of the output projection; a neuron's activation is multiplied by
the norm of its down-projection column. Projecting through the output weights makes a unit whose output weights are
zero score 0, as it contributes nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..linear import matrix_view
from ..structure import UnitSlot
from .base import UnitCriterion, register_unit_criterion


class ActivationCriterion(UnitCriterion):
    def hook(self, slot: UnitSlot, module: nn.Module, inputs: tuple, state: dict) -> Optional[tuple]:
        x = inputs[0]
        units = len(slot.kept)
        with torch.no_grad():
            w = matrix_view(module).detach().float()  # (out, units * width)
            xs = x.detach().float().reshape(x.shape[0], -1, units, slot.unit_width)
            if slot.unit_width == 1:
                norms = xs[..., 0].abs() * w.norm(dim=0)
            else:
                # |W_h c_h|^2 = c_h^T (W_h^T W_h) c_h: one small Gram matrix per head instead of the full product.
                wh = w.view(w.shape[0], units, slot.unit_width)
                gram = torch.einsum("ohd,ohe->hde", wh, wh)
                norms = torch.einsum("bshd,hde,bshe->bsh", xs, gram, xs).clamp_min(0).sqrt()
            mask = state.get("token_mask")
            if mask is not None and mask.shape == norms.shape[:2]:
                norms = norms * mask[..., None]
                count = mask.sum()
            else:
                count = torch.tensor(float(norms.shape[0] * norms.shape[1]), device=norms.device)
            state["sums"][id(slot)] += norms.sum(dim=(0, 1))
            if x.dim() > 2:
                # (batch, tokens, ...) inputs count the batch's tokens; the experts of a mixture-of-experts layer see
                # only the tokens routed to them, flattened, and are averaged over all tokens like the others.
                state["count"] = count
        return None

    def run_batch(self, model: nn.Module, batch: dict[str, Any], live: list[UnitSlot], state: dict, totals) -> None:
        device = next(iter(totals.values())).device
        mask = batch.get("attention_mask")
        state["token_mask"] = mask.float() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        state["sums"] = {id(slot): torch.zeros(len(slot.kept), device=device) for slot in live}
        ids = batch.get("input_ids")
        tokens = state["token_mask"].sum() if state["token_mask"] is not None else (
            ids.numel() if isinstance(ids, torch.Tensor) else 1)
        state["count"] = torch.as_tensor(float(tokens), device=device)
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        count = state.get("count", torch.tensor(1.0)).clamp_min(1)
        for slot in live:
            totals[slot.layer_idx][slot.kept] += state["sums"][id(slot)] / count


register_unit_criterion("activation", ActivationCriterion)
