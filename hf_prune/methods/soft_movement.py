"""Soft movement pruning: learned scores with a sparsity regulariser (Sanh et al. 2020, section 4)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .base import PruningMethod, register_method


class SoftMovementMethod(PruningMethod):
    """Scores are parameters stepped by the optimizer with the straight-through gradient dL/dS = dL/dW' * W
    (Sanh et al., eq. 5), plus the gradient of `regularization_lambda` x mean(sigmoid(S)). They start at |W| scaled
    to [0, 1], so ranking begins as magnitude and moves as training says otherwise. Needs `PruningTrainer`, which
    adds the scores to the optimizer (at `score_learning_rate`, no weight decay) and the term to the logged loss.

    Cost. The regulariser's gradient, lambda * sigmoid'(S) / N, is added in closed form rather than by autograd, and
    refreshed every `pruning_interval` steps: the scores move by about one learning rate per step, so sigmoid'(S)
    barely changes in between, and re-evaluating a sigmoid over every targeted weight each step would cost more than
    the rest of the method. Gradient buffers are allocated once and reused (a fresh 4-byte-per-weight allocation per
    step costs more than the arithmetic on it).
    """

    requires_trainer = True
    needs_gradients = True

    def attach(self, modules: dict[str, nn.Module]) -> None:
        super().attach(modules)
        self.score_tensors = {n: nn.Parameter(_normalised_magnitude(m.weight)) for n, m in modules.items()}
        self.num_weights = sum(m.weight.numel() for m in modules.values())
        self.regularizer_grads: dict[str, torch.Tensor] = {}
        self.regularizer_value = torch.zeros(())
        self.steps_since_refresh = 0

    @torch.no_grad()
    def refresh_regularizer(self) -> None:
        """Recompute lambda * mean(sigmoid(S)) and its gradient lambda * sigmoid(S) * (1 - sigmoid(S)) / N."""
        scale = self.config.regularization_lambda / self.num_weights
        scores = list(self.score_tensors.values())
        if not self.regularizer_grads:
            self.regularizer_grads = {n: torch.empty_like(s) for n, s in self.score_tensors.items()}
        grads = list(self.regularizer_grads.values())
        torch._foreach_copy_(grads, scores)
        torch._foreach_sigmoid_(grads)
        total = torch.stack([g.sum() for g in grads]).sum()
        self.regularizer_value = (scale * total).detach()
        # g <- scale * (g - g * g), in place.
        torch._foreach_addcmul_(grads, grads, grads, value=-1.0)
        torch._foreach_mul_(grads, scale)
        self.steps_since_refresh = 0

    @torch.no_grad()
    def on_gradients(self, names: Sequence[str], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if not self.regularizer_grads:
            self.refresh_regularizer()
        scores = [self.score_tensors[n] for n in names]
        for name, score in zip(names, scores):
            if score.grad is None:
                score.grad = torch.zeros_like(score)
        # grad = regulariser gradient + W * dL/dW, written in one pass into the persistent buffer.
        for name, score, weight, grad in zip(names, scores, weights, grads):
            regularizer = self.regularizer_grads[name]
            if weight.dtype == grad.dtype == regularizer.dtype:
                torch.addcmul(regularizer, weight, grad, out=score.grad)
            else:
                torch.addcmul(regularizer, weight.float(), grad.float(), out=score.grad)

    def after_optimizer_step(self) -> None:
        # Gradients are overwritten next step (the buffers stay allocated); the regulariser is refreshed on schedule.
        self.steps_since_refresh += 1
        if self.steps_since_refresh >= self.config.pruning_interval:
            self.refresh_regularizer()

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return self.score_tensors[name].detach()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.score_tensors.values())

    def regularization(self) -> torch.Tensor:
        """Mean sigmoid of the learned scores (unweighted, differentiable): what the regulariser penalises."""
        total = torch.stack([torch.sigmoid(p).sum() for p in self.score_tensors.values()]).sum()
        return total / self.num_weights

    def loss(self) -> Optional[torch.Tensor]:
        # The value for the logged loss; its gradient reaches the scores in on_gradients, not through autograd.
        if self.config.regularization_lambda == 0:
            return None
        if not self.regularizer_grads:
            self.refresh_regularizer()
        return self.regularizer_value

    def state_dict(self) -> dict[str, Any]:
        # The cached regulariser gradient is saved too: recomputing it from the current scores on resume would
        # differ slightly from the uninterrupted run, and resumed runs must end with the same masks.
        return {
            "scores": {n: s.detach().clone() for n, s in self.score_tensors.items()},
            "regularizer_grads": {n: g.clone() for n, g in self.regularizer_grads.items()},
            "regularizer_value": self.regularizer_value.clone(),
            "steps_since_refresh": self.steps_since_refresh,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.get("scores", {}).items():
            if name in self.score_tensors:
                self.score_tensors[name].copy_(saved)
        self.refresh_regularizer()
        for name, saved in state.get("regularizer_grads", {}).items():
            if name in self.regularizer_grads:
                self.regularizer_grads[name].copy_(saved)
        if "regularizer_value" in state:
            self.regularizer_value = state["regularizer_value"].clone()
        self.steps_since_refresh = int(state.get("steps_since_refresh", 0))


def _normalised_magnitude(weight: torch.Tensor) -> torch.Tensor:
    magnitude = weight.detach().abs().float()
    return magnitude / magnitude.max().clamp_min(1e-12)


register_method("soft_movement", SoftMovementMethod)
