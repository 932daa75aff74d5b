"""Patterns of zeros and the selection of the weights to prune.

Masks are boolean tensors with True where a weight is pruned. They live beside the model, never inside it: the
model keeps plain `nn.Linear` modules with zeros in place, so its state dict stays standard and saves, reloads and
exports like any other model. All patterns are computed on the (out_features, in_features) view of a weight; GPT-2's
`Conv1D` stores the transpose and is viewed accordingly.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .config import DEFAULT_EXCLUDE, DEFAULT_TARGETS, PruningConfig


def is_prunable_module(module: nn.Module) -> bool:
    """nn.Linear and Transformers' Conv1D (GPT-2 family) are the layers pruning applies to."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matrix_view(module: nn.Module, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`tensor` (default the weight) as (out_features, in_features), a view that shares storage."""
    tensor = module.weight if tensor is None else tensor
    return tensor.t() if type(module).__name__ == "Conv1D" else tensor


def find_target_modules(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, nn.Module]:
    """Prunable modules whose qualified name matches a `targets` regex and no `exclude` regex, in model order."""
    found = {}
    for name, module in model.named_modules():
        if not is_prunable_module(module):
            continue
        if any(re.search(p, name) for p in targets) and not any(re.search(p, name) for p in exclude):
            found[name] = module
    return found


def unit_scores(scores: torch.Tensor, config: PruningConfig) -> torch.Tensor:
    """Scores of the units the pattern prunes together, flattened (lower is pruned first).

    - unstructured: one unit per weight;
    - block: one unit per (rows x cols) block, scored by the sum of its weights' scores;
    - n:m: one unit per weight, but only the M-N lowest of every M consecutive input weights may be pruned (the
      others score +inf), so any sparsity up to 1 - N/M is reachable and the final one is exactly N:M.
    """
    if config.granularity == "unstructured":
        return scores.reshape(-1)
    if config.granularity == "block":
        rows, cols = config.block_dims
        out_f, in_f = scores.shape
        return scores.reshape(out_f // rows, rows, in_f // cols, cols).sum(dim=(1, 3)).reshape(-1)
    n, m = config.n_m_values
    groups = scores.reshape(scores.shape[0], -1, m)
    ranks = groups.argsort(dim=-1).argsort(dim=-1)
    return groups.masked_fill(ranks >= m - n, float("inf")).reshape(-1)


def expand_units(pruned_units: torch.Tensor, shape: torch.Size, config: PruningConfig) -> torch.Tensor:
    """Unit-level decisions back to a weight-shaped (out, in) mask."""
    if config.granularity != "block":
        return pruned_units.reshape(shape)
    rows, cols = config.block_dims
    blocks = pruned_units.reshape(shape[0] // rows, shape[1] // cols)
    return blocks.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)


def select_lowest(units: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Mark the lowest-scoring units across `units` so that `sparsity` of all units is pruned.

    Units of one pattern all hold the same number of weights, so a fraction of units is a fraction of weights.
    Ranking is by `topk`, not by a threshold, so ties (the many zeros of already-pruned weights) cannot overshoot:
    the count is exact.
    """
    sizes = [u.numel() for u in units]
    total = sum(sizes)
    k = min(int(round(sparsity * total)), total)
    flat = torch.cat([u.reshape(-1).float() for u in units]) if len(units) > 1 else units[0].reshape(-1).float()
    pruned = torch.zeros(total, dtype=torch.bool, device=flat.device)
    if k > 0:
        pruned[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    return list(pruned.split(sizes))


def check_pattern_fits(name: str, module: nn.Module, config: PruningConfig) -> None:
    """Fail early when a block or N:M pattern cannot tile a targeted weight."""
    out_f, in_f = matrix_view(module).shape
    if config.granularity == "block":
        rows, cols = config.block_dims
        if out_f % rows or in_f % cols:
            raise ValueError(
                f"PruningConfig.block_shape={config.block_shape!r} does not tile module {name!r} with weight "
                f"(out_features={out_f}, in_features={in_f}): rows must divide {out_f} and cols must divide {in_f}. "
                "Choose another block_shape or exclude the module."
            )
    elif config.granularity == "n:m":
        _, m = config.n_m_values
        if in_f % m:
            raise ValueError(
                f"PruningConfig.n_m={config.n_m!r}: M={m} does not divide in_features={in_f} of module {name!r}. "
                "Choose an M that divides every targeted layer's input dimension or exclude the module."
            )


def sparsity_report(
    model: nn.Module,
    targets: Optional[Iterable[str]] = None,
    exclude: Optional[Iterable[str]] = None,
) -> dict:
    """Measured sparsity of the targeted weights, from the weights themselves (zeros counted, nothing assumed).

    Args:
        model: any PyTorch model.
        targets / exclude: module-name regexes; default: the Linear layers inside the transformer blocks.

    Returns:
        {"global_sparsity", "targeted_params", "zero_params", "model_params", "model_zero_params", "modules": {name:
        {"sparsity", "params", "zeros", "shape"}}}. Sparsities are fractions in [0, 1].
    """
    modules = find_target_modules(model, tuple(targets or DEFAULT_TARGETS), tuple(exclude or DEFAULT_EXCLUDE))
    per_module = {}
    zeros_total = params_total = 0
    for name, module in modules.items():
        weight = module.weight.detach()
        zeros = int((weight == 0).sum())
        per_module[name] = {
            "sparsity": zeros / weight.numel(),
            "params": weight.numel(),
            "zeros": zeros,
            "shape": list(matrix_view(module, weight).shape),
        }
        zeros_total += zeros
        params_total += weight.numel()
    model_params = sum(p.numel() for p in model.parameters())
    model_zeros = sum(int((p.detach() == 0).sum()) for p in model.parameters())
    return {
        "global_sparsity": zeros_total / params_total if params_total else 0.0,
        "targeted_params": params_total,
        "zero_params": zeros_total,
        "model_params": model_params,
        "model_zero_params": model_zeros,
        "modules": per_module,
    }
