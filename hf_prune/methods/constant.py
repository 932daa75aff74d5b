"""Constant masks: keep the zeros a model already has while it is fine-tuned (recovery after one-shot pruning, what
llm-compressor calls a constant-pruning modifier)."""

from __future__ import annotations

import torch
from torch import nn

from .base import PruningMethod, register_method


class ConstantMethod(PruningMethod):
    """Prunes nothing new: the masks are the targeted weights that are zero when training starts, and they stay
    applied (gradients masked before each optimizer step, weights after it), so fine-tuning cannot revive them.
    `PruningConfig.target_sparsity` and the schedule are not used."""

    fixed_masks = True

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return (module.weight.detach() != 0).float()  # the zeros rank lowest: they are the mask


register_method("constant", ConstantMethod)
