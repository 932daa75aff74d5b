"""SparseGPT: one-shot pruning with an optimal-brain-surgeon update of the kept weights (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot")."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..linear import matrix_view, stored_layout
from .base import PruningMethod, register_method

# Columns solved together: the paper's lazy batch update (the inverse Hessian rows of one block stay in cache).
BLOCK_SIZE = 128
# Dampening added to the Hessian diagonal, as a fraction of its mean: keeps the Cholesky factorisation stable when
# some inputs are (nearly) constant over the calibration set.
DAMPENING = 0.01


class SparseGPTMethod(PruningMethod):
    """Prune each layer to minimise ||W X - W' X||^2 over the calibration inputs X: weights are removed column by
    column, and the error of each removal is pushed onto the columns not yet visited through the inverse Hessian
    (X X^T + damping). Which weights go is chosen per block of columns by w^2 / [H^-1]_jj^2.

    One-shot only: it updates the kept weights from second-order statistics of a calibration set, which has no
    counterpart during fine-tuning. Use `hf_prune.oneshot(model, data, method="sparsegpt")`.
    """

    needs_inputs = True
    one_shot_only = True

    def attach(self, modules: dict[str, nn.Module]) -> None:
        super().attach(modules)
        self.hessians: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}

    @torch.no_grad()
    def observe(self, name: str, inputs: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if name not in self.hessians:
            width = flat.shape[1]
            self.hessians[name] = torch.zeros(width, width, dtype=torch.float32, device=flat.device)
            self.samples[name] = 0
        # Running mean of 2 X X^T over tokens (the paper's scale; the factor does not change the solution but keeps
        # the dampening relative to a comparable diagonal).
        seen, new = self.samples[name], flat.shape[0]
        hessian = self.hessians[name]
        hessian.mul_(seen / (seen + new))
        flat = flat * (2.0 / (seen + new)) ** 0.5
        hessian.addmm_(flat.t(), flat)
        self.samples[name] = seen + new

    @torch.no_grad()
    def prune_module(self, name: str, module: nn.Module, sparsity: float) -> torch.Tensor:
        if name not in self.hessians:
            raise ValueError(f"hf_prune: SparseGPT saw no calibration input for {name!r}: the calibration batches never "
                             "reached it (check the data and PruningConfig.targets).")
        n_m = self.config.n_m_values if self.config.granularity == "n:m" else None
        weight = matrix_view(module).detach()
        pruned_weight, mask = sparsegpt_prune(weight, self.hessians[name], sparsity, n_m)
        module.weight.copy_(stored_layout(module, pruned_weight.to(weight.dtype)))
        return stored_layout(module, mask)

    def detach(self, name: str) -> None:
        self.hessians.pop(name, None)
        self.samples.pop(name, None)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: Optional[tuple[int, int]] = None,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` (out_features, in_features) given the Hessian of its inputs (in_features, in_features).

    Args:
        sparsity: fraction of each column block's weights to remove (unstructured; exactly that many per block).
        n_m: (N, M) to keep N of every M consecutive inputs of each row instead (sparsity is then 1 - N/M).

    Returns the updated weight (float32, zeros where pruned) and the mask (True = pruned), both (out, in).
    """
    w = weight.float().clone(memory_format=torch.contiguous_format)
    rows, columns = w.shape
    h = hessian.to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0  # inputs never non-zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(dampening * torch.mean(torch.diag(h)))
    # The upper Cholesky factor of H^-1: its rows give the update of the remaining columns for each removal.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        count = end - start
        w_block = w[:, start:end].clone(memory_format=torch.contiguous_format)
        errors = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        diag = torch.diag(h_inv_block)
        block_mask = torch.zeros_like(w_block, dtype=torch.bool)
        if n_m is None:
            saliency = w_block.pow(2) / diag.pow(2).unsqueeze(0)
            k = int(round(sparsity * saliency.numel()))
            if k:
                block_mask.view(-1)[torch.topk(saliency.reshape(-1), k, largest=False).indices] = True
        for i in range(count):
            if n_m is not None and i % n_m[1] == 0:
                group = w_block[:, i:i + n_m[1]].pow(2) / diag[i:i + n_m[1]].pow(2).unsqueeze(0)
                lowest = torch.topk(group, n_m[1] - n_m[0], dim=1, largest=False).indices
                block_mask.scatter_(1, i + lowest, True)
            column = w_block[:, i]
            kept = column.masked_fill(block_mask[:, i], 0.0)
            error = (column - kept) / h_inv_block[i, i]
            w_block[:, i:].sub_(error.unsqueeze(1) * h_inv_block[i, i:].unsqueeze(0))
            w_block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = w_block
        w[:, end:].sub_(errors @ h_inv[start:end, end:])
        mask[:, start:end] = block_mask
    w.masked_fill_(mask, 0.0)
    return w, mask


register_method("sparsegpt", SparseGPTMethod)
