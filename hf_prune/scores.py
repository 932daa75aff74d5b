"""Which weights matter: importance scores, higher means keep.

Plain tensors in, plain tensors out, so the same code serves the callbacks, the trainer and one-shot use.
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32: the classic criterion (Han et al. 2015; Zhu & Gupta 2017)."""
    return weight.detach().abs().float()


@torch.no_grad()
def accumulate_movement(scores: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> None:
    """Add -W * dL/dW to `scores` in place (Sanh et al. 2020).

    Weights moving away from zero during fine-tuning score high, weights pulled towards zero score low, whatever
    their size: the signal magnitude pruning misses when fine-tuning changes which weights matter. Called once per
    optimizer step, when the gradient holds the sum over all accumulation micro-batches.
    """
    scores.addcmul_(weight.detach().float(), grad.detach().float(), value=-1.0)


def movement_score_gradient(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dS for learned scores under a straight-through mask: dL/dW' * W (Sanh et al. 2020, eq. 5)."""
    return weight.detach().float() * grad.detach().float()
