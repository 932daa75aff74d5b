"""Magnitude pruning: |W| (Han et al. 2015; gradual, Zhu & Gupta 2017, "To prune, or not to prune")."""

from __future__ import annotations

import torch
from torch import nn

from .base import PruningMethod, register_method


class MagnitudeMethod(PruningMethod):
    """Keeps the largest weights. Needs nothing per step: the cheapest criterion, and a strong one when fine-tuning
    moves weights little."""

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().abs().float()


register_method("magnitude", MagnitudeMethod)
