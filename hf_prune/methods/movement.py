"""Hard movement pruning (Sanh et al. 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning")."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..sharding import full, shard_like
from .base import PruningMethod, register_method, same_dtype


class MovementMethod(PruningMethod):
    """Scores accumulate -W * dL/dW over training: weights that fine-tuning pushes away from zero score high, weights
    it pulls towards zero score low, whatever their size -- the signal magnitude pruning misses when fine-tuning
    changes which weights matter. Needs many steps for the scores to mean something."""

    needs_gradients = True

    def attach(self, modules: dict[str, nn.Module]) -> None:
        super().attach(modules)
        self.score_tensors = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}

    @torch.no_grad()
    def on_gradients(self, names: Sequence[str], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        scores = [self.score_tensors[n] for n in names]
        if same_dtype(scores, weights, grads):
            # One batched multiply-add over all layers: a Python loop of small ops costs more than the arithmetic.
            torch._foreach_addcmul_(scores, weights, grads, value=-1.0)
        else:
            for score, weight, grad in zip(scores, weights, grads):
                score.addcmul_(weight.float(), grad.float(), value=-1.0)

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return self.score_tensors[name]

    def state_dict(self) -> dict[str, Any]:
        # Whole tensors, also under FSDP2 (gathered: every rank calls this), so that a state resumes at any world size.
        return {"scores": {n: full(s.detach()).clone() for n, s in self.score_tensors.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.get("scores", {}).items():
            if name in self.score_tensors:
                score = self.score_tensors[name]
                score.copy_(shard_like(saved.to(score.dtype), score))


register_method("movement", MovementMethod)
