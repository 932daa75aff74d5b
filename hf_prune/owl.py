"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing
Secret Sauce for Pruning LLMs to High Sparsity").

Layers whose Wanda scores |W_ij| * ||X_j|| (Sun et al. 2024) hold more outliers -- entries above `threshold_m` times
the layer's mean score -- carry more of what the model computes and should be pruned less. OWL sets each layer's
sparsity to `target - lambda_ * z_l`, where z_l is the layer's outlier ratio rescaled to [0, 2] across layers and
centred, so sparsities span 2 * lambda_ around the target. A baseline for `allocate_sparsity` that needs only forward
passes on a few calibration batches, no per-group measurements.

The OWL code centres with a plain mean over LLaMA's equally sized layers; here the mean is weighted by each layer's
targeted weights, so the global sparsity over the targeted weights is the target exactly, and the plan comes in
`allocate_sparsity`'s format (`PruningConfig.sparsity_overrides`, one anchored key per module).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import check_bounds, exact_overrides
from .blocks import module_layers
from .config import DEFAULT_EXCLUDE, DEFAULT_TARGETS
from .linear import matrix_view
from .masks import find_target_modules
from .units.base import move_batch

# Bisection steps for the common shift that puts the clipped sparsities' mean back on the target.
_SHIFT_STEPS = 200


def input_norms(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    dataloader: Iterable[Mapping[str, Any]],
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature j of each module over the calibration tokens (padding left out), float32,
    on the module's device.

    Forward passes only, in eval mode, under no_grad; train/eval mode is restored.
    """
    sums = {name: torch.zeros(matrix_view(m).shape[1], dtype=torch.float32, device=m.weight.device)
            for name, m in modules.items()}
    state: dict[str, Optional[torch.Tensor]] = {"mask": None}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x * mask[..., None]
            sums[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0).to(sums[name].device)
        return hook

    device = next(model.parameters()).device
    training = {m: m.training for m in model.modules()}
    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in modules.items()]
    model.eval()
    batches = 0
    try:
        source = dataloader if max_batches is None else itertools.islice(dataloader, max_batches)
        with torch.no_grad():
            for batch in tqdm(source, desc="OWL calibration", disable=not progress):
                batch = move_batch(batch, device)
                mask = batch.get("attention_mask")
                state["mask"] = mask.float() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                model(**{k: v for k, v in batch.items() if k != "labels"})
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    if batches == 0:
        raise ValueError("owl_sparsity: the dataloader yielded no batches; OWL needs calibration activations.")
    return {name: total.sqrt() for name, total in sums.items()}


def outlier_ratio(scores: Sequence[torch.Tensor], threshold_m: float) -> float:
    """Fraction of all entries of `scores` above `threshold_m` times their common mean (OWL's layer outlier
    distribution, LOD)."""
    device = scores[0].device
    flat = torch.cat([s.reshape(-1).to(device) for s in scores])
    return float((flat > threshold_m * flat.mean()).float().mean())


def _shift_into_bounds(values: Sequence[float], weights: Sequence[float], target: float, lower: float,
                       upper: float) -> list[float]:
    """values + c, clipped to [lower, upper], with c chosen by bisection so that the weighted mean is `target`."""
    total = float(sum(weights))

    def mean(shift: float) -> float:
        return sum(min(max(v + shift, lower), upper) * w for v, w in zip(values, weights)) / total

    low, high = -1.0 - max(values), 1.0 - min(values)
    for _ in range(_SHIFT_STEPS):
        middle = (low + high) / 2
        if mean(middle) < target:
            low = middle
        else:
            high = middle
    return [min(max(v + high, lower), upper) for v in values]


def owl_sparsity(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    target_sparsity: float,
    threshold_m: float = 5.0,
    lambda_: float = 0.08,
    max_batches: Optional[int] = 32,
    *,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    progress: bool = True,
    return_ratios: bool = False,
) -> Union[dict[str, float], tuple[dict[str, float], dict[str, float]]]:
    """Per-layer sparsity by outlier ratio (OWL), as `PruningConfig.sparsity_overrides`.

    Args:
        model: the model to prune (weights are only read).
        dataloader: calibration batches (dicts with `input_ids`, `attention_mask`; `labels` are ignored).
        target_sparsity: global sparsity over the targeted weights, in [min_sparsity, max_sparsity].
        threshold_m: an entry is an outlier above threshold_m times its layer's mean Wanda score (OWL's M; 5 in the
            paper's LLaMA runs).
        lambda_: sparsities span target +- lambda_ (OWL's lambda, 0.08 in the paper).
        max_batches: calibration batches used (None: all).
        min_sparsity / max_sparsity: bounds on every layer; clipping is compensated by a common shift, so the mean
            stays the target.
        targets / exclude: module-name regexes of the Linears pruned (PruningConfig's defaults); modules outside
            the transformer blocks form a layer of their own each.
        return_ratios: also return {layer path: outlier ratio}.

    Returns:
        {"^<escaped module name>$": sparsity} (every module of a layer gets the layer's sparsity, within half a
        weight), whose parameter-weighted mean is `target_sparsity`; with `return_ratios`, (overrides, ratios).
    """
    function = "owl_sparsity"
    check_bounds(function, target_sparsity, min_sparsity, max_sparsity,
                 ("target_sparsity", "min_sparsity", "max_sparsity"))
    if isinstance(threshold_m, bool) or not isinstance(threshold_m, (int, float)) or threshold_m <= 0:
        raise ValueError(f"{function}: threshold_m={threshold_m!r} is invalid: a positive multiple of the mean score, "
                         "e.g. 5.")
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not 0.0 <= lambda_ < 1.0:
        raise ValueError(f"{function}: lambda_={lambda_!r} is invalid: a sparsity spread in [0, 1), e.g. 0.08.")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"{function}: max_batches={max_batches!r} is invalid: a positive number, or None for all.")
    modules = find_target_modules(model, tuple(targets), tuple(exclude))
    if not modules:
        raise ValueError(f"{function}: targets={list(targets)} (exclude={list(exclude)}) matches no nn.Linear/Conv1D "
                         f"module of {type(model).__name__}.")
    norms = input_norms(model, modules, dataloader, max_batches, progress)
    layers: dict[str, list[str]] = {}
    for name, found in module_layers(model, modules).items():
        layers.setdefault(found[0] if found is not None else name, []).append(name)
    ratios, sizes = {}, {}
    with torch.no_grad():
        for layer, names in layers.items():
            scores = [matrix_view(modules[n]).detach().abs().float() * norms[n][None, :] for n in names]
            ratios[layer] = outlier_ratio(scores, threshold_m)
            sizes[layer] = sum(modules[n].weight.numel() for n in names)
    keys = list(layers)
    low, high = min(ratios.values()), max(ratios.values())
    scaled = [0.0 if high - low <= 1e-12 else 2.0 * (ratios[k] - low) / (high - low) for k in keys]
    weights = [float(sizes[k]) for k in keys]
    centre = sum(s * w for s, w in zip(scaled, weights)) / sum(weights)
    raw = [target_sparsity - lambda_ * (s - centre) for s in scaled]
    bounded = _shift_into_bounds(raw, weights, target_sparsity, min_sparsity, max_sparsity)
    per_module = {n: level for k, level in zip(keys, bounded) for n in layers[k]}
    numel = {n: modules[n].weight.numel() for n in per_module}
    overrides = exact_overrides(per_module, numel, target_sparsity, min_sparsity, max_sparsity, function)
    return (overrides, ratios) if return_ratios else overrides
