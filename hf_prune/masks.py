"""Patterns of zeros and the selection of the weights to prune.

Masks are boolean tensors with True where a weight is pruned. They live beside the model, never inside it: the
model keeps plain `nn.Linear` modules with zeros in place, so its state dict stays standard and saves, reloads and
exports like any other model. All patterns are computed on the (out_features, in_features) view of a weight; GPT-2's
`Conv1D` stores the transpose and is viewed accordingly.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .config import DEFAULT_EXCLUDE, DEFAULT_TARGETS, PruningConfig
from .linear import is_prunable_module, matrix_view
from .sharding import full

# Below this many units, one `topk` over all of them is fast enough; above it, `select_lowest` finds the k-th value
# from a sample and a few counting passes instead (topk over MiniLM's 10.6M weights took ~0.25 s per mask update).
DIRECT_SELECTION_LIMIT = 1 << 20


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

    Units of one pattern all hold the same number of weights, so a fraction of units is a fraction of weights. The
    count is exact: k = round(sparsity * total) units are marked, never more, whatever the ties (the many -inf of
    already-pruned weights, equal magnitudes). Among units tied at the k-th value, the first in order are taken.
    """
    flats = [u.reshape(-1).float() for u in units]
    sizes = [f.numel() for f in flats]
    total = sum(sizes)
    k = min(int(round(sparsity * total)), total)
    if k <= 0:
        return [torch.zeros(n, dtype=torch.bool, device=f.device) for n, f in zip(sizes, flats)]
    if k >= total:
        return [torch.ones(n, dtype=torch.bool, device=f.device) for n, f in zip(sizes, flats)]
    if total <= DIRECT_SELECTION_LIMIT:
        flat = torch.cat(flats) if len(flats) > 1 else flats[0]
        pruned = torch.zeros(total, dtype=torch.bool, device=flat.device)
        pruned[torch.topk(flat, k, largest=False, sorted=False).indices] = True
        return list(pruned.split(sizes))
    value = _kth_smallest(flats, k, total)
    pruned = [f < value for f in flats]
    missing = k - sum(int(p.sum()) for p in pruned)
    for flat, mask in zip(flats, pruned):  # ties at the k-th value: the first ones, in order
        if missing <= 0:
            break
        tied = torch.nonzero(flat == value).flatten()[:missing]
        mask[tied] = True
        missing -= tied.numel()
    return pruned


def _count(flats: Sequence[torch.Tensor], predicate) -> int:
    return sum(int(predicate(f).sum()) for f in flats)


def _kth_smallest(flats: Sequence[torch.Tensor], k: int, total: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of all `flats` together, without sorting or concatenating them.

    A strided sample brackets the k-th value between two sample quantiles; counting passes check the bracket
    and only the values inside it are gathered and ranked exactly. If the sample misled (adversarial order), the
    whole set is ranked: the answer is exact either way.
    """
    stride = max(total // 65536, 1)
    sample = torch.sort(torch.cat([f[::stride] for f in flats])).values
    m = sample.numel()
    centre = k / total * (m - 1)
    margin = 4.0 * math.sqrt(m) + 8
    lo_index, hi_index = int(max(centre - margin, 0)), int(min(centre + margin, m - 1))
    lo = sample[lo_index] if lo_index > 0 else torch.tensor(float("-inf"))
    hi = sample[hi_index] if hi_index < m - 1 else torch.tensor(float("inf"))
    below = _count(flats, lambda f: f < lo)
    at_or_below_lo = _count(flats, lambda f: f <= lo)
    if below < k <= at_or_below_lo:
        return lo
    below_hi = _count(flats, lambda f: f < hi)
    at_or_below_hi = _count(flats, lambda f: f <= hi)
    if below_hi < k <= at_or_below_hi:
        return hi
    if at_or_below_lo < k <= below_hi:
        inside = torch.cat([f[(f > lo) & (f < hi)] for f in flats])
        return torch.kthvalue(inside, k - at_or_below_lo).values
    return torch.kthvalue(torch.cat(flats), k).values


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


def config_sparsity_report(model: nn.Module, config: PruningConfig) -> dict:
    """`sparsity_report` over the layers `config` prunes (its `targets` and `exclude`): what every saved report,
    plot and logged sparsity of a pruning run measures."""
    return sparsity_report(model, config.targets, config.exclude)


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
        weight = full(module.weight.detach())  # FSDP2: counted on the whole tensor, not this process's shard
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
