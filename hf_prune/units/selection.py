"""Which heads and FFN neurons to remove: the lowest-scoring ones across all layers, whole key/value groups under
grouped-query attention, already removed ones counted towards the fraction (so a growing fraction over a schedule
removes units gradually). With a per-layer budget (`layer_budget`, e.g. from `hf_prune.allocate_units`), each layer
loses exactly its own count instead: the lowest-scoring units of that layer."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from ..structure import find_layers, structure_summary
from ..structure.layout import expert_size, experts_are_fused, kept_experts_of, min_heads_per_block, moe_pruned_neurons
from ..structure.paths import get_module


def select_units(
    scores: dict[int, torch.Tensor],
    fraction: Optional[float],
    already: dict[int, set[int]],
    group_size: int,
    min_per_layer: int,
    allow_remove_all: bool,
    kind: str,
    budget: Optional[Mapping[int, int]] = None,
) -> dict[int, list[int]]:
    """Lowest-scoring units across all layers until `fraction` of all units is gone (already removed ones count), or,
    with `budget` ({layer: units to be gone}), the lowest-scoring units of each layer until its budget is gone."""
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hf_prune: the fraction of {kind} to prune must be in [0, 1], got {fraction}.")
    total_units = sum(len(s) for s in scores.values())
    if budget is not None:
        return select_within_budget(scores, fraction, budget, already, group_size, min_per_layer, allow_remove_all,
                                    kind)
    if fraction is None:
        raise ValueError(f"hf_prune: give the fraction of {kind} to prune, or a per-layer layer_budget.")
    target_groups = int(round(fraction * total_units / group_size))
    candidates = []  # (score, layer, group)
    gone_groups = 0
    for layer, row in scores.items():
        if len(row) % group_size:
            raise ValueError(
                f"hf_prune: layer {layer} has {len(row)} {kind}, not a multiple of group_size={group_size}."
            )
        for g in range(len(row) // group_size):
            members = range(g * group_size, (g + 1) * group_size)
            if all(m in already.get(layer, set()) for m in members):
                gone_groups += 1
            else:
                candidates.append((float(row[g * group_size : (g + 1) * group_size].sum()), layer, g))
    live_per_layer: dict[int, int] = {}
    for _, layer, _ in candidates:
        live_per_layer[layer] = live_per_layer.get(layer, 0) + 1
    budget = target_groups - gone_groups
    if not allow_remove_all and budget >= len(candidates):
        budget = len(candidates) - 1  # keep the single most important one in the whole model
    result = {layer: set(units) for layer, units in already.items() if units}
    floor = -(-min_per_layer // group_size)  # groups that must stay per layer
    for _, layer, g in sorted(candidates):
        if budget <= 0:
            break
        if live_per_layer[layer] <= floor:
            continue
        result.setdefault(layer, set()).update(range(g * group_size, (g + 1) * group_size))
        live_per_layer[layer] -= 1
        budget -= 1
    return {layer: sorted(units) for layer, units in sorted(result.items()) if units}


def select_within_budget(
    scores: dict[int, torch.Tensor],
    fraction: Optional[float],
    budget: Mapping[int, int],
    already: dict[int, set[int]],
    group_size: int,
    min_per_layer: int,
    allow_remove_all: bool,
    kind: str,
) -> dict[int, list[int]]:
    """Each layer's lowest-scoring groups until `budget[layer]` of its units are gone (0 for layers not named).

    Units already removed count towards their layer's budget and stay removed, so a layer that already lost more
    than its budget keeps its removals (removal is monotone). With a `fraction` too, the budget must remove the same
    number of units a global selection would; that guards against a budget made for another fraction.
    """
    budget = {int(layer): count for layer, count in budget.items()}
    unknown = sorted(set(budget) - set(scores))
    if unknown:
        raise ValueError(f"hf_prune: layer_budget names layer(s) {unknown} that the model does not have; its layers "
                         f"are {sorted(scores)}.")
    total_units = sum(len(s) for s in scores.values())
    for layer, count in budget.items():
        units = len(scores[layer])
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= units - min_per_layer:
            raise ValueError(f"hf_prune: layer_budget[{layer}]={count!r} is invalid: a whole number of {kind} in "
                             f"[0, {units - min_per_layer}] (layer {layer} has {units}, min per layer "
                             f"{min_per_layer}).")
        if count % group_size:
            raise ValueError(f"hf_prune: layer_budget[{layer}]={count} is invalid: {kind} go in groups of "
                             f"{group_size} (grouped-query attention); give a multiple of {group_size}.")
    wanted = sum(budget.values())
    if fraction is not None and wanted // group_size != int(round(fraction * total_units / group_size)):
        raise ValueError(f"hf_prune: layer_budget removes {wanted} {kind} but fraction={fraction} of {total_units} "
                         f"removes {int(round(fraction * total_units / group_size)) * group_size}; give the fraction "
                         "the budget was made for (hf_prune.allocate_units), or fraction=None.")
    if wanted >= total_units and not allow_remove_all:
        raise ValueError(f"hf_prune: layer_budget removes all {total_units} {kind} of the model; pass "
                         "allow_remove_all=True if that is meant.")
    result = {layer: set(units) for layer, units in already.items() if units}
    for layer, row in scores.items():
        gone = result.setdefault(layer, set())
        candidates = []
        for g in range(len(row) // group_size):
            members = range(g * group_size, (g + 1) * group_size)
            if not all(m in gone for m in members):
                candidates.append((float(row[g * group_size : (g + 1) * group_size].sum()), g))
        missing_groups = (budget.get(layer, 0) - len(gone)) // group_size
        for _, g in sorted(candidates)[: max(missing_groups, 0)]:
            gone.update(range(g * group_size, (g + 1) * group_size))
    return {layer: sorted(units) for layer, units in sorted(result.items()) if units}


def select_heads_to_prune(
    importance: torch.Tensor,
    fraction: Optional[float] = None,
    *,
    model: Optional[nn.Module] = None,
    already_pruned: Optional[Mapping[int, Iterable[int]]] = None,
    group_size: Optional[int] = None,
    min_heads_per_layer: int = 0,
    allow_remove_all: bool = False,
    layer_budget: Optional[Mapping[int, int]] = None,
) -> dict[int, list[int]]:
    """The heads to be gone so that `fraction` of all heads is removed, lowest importance first, across layers.

    Args:
        importance: [num_layers, num_heads] from `compute_head_importance`.
        fraction: target fraction of ALL original heads removed, already removed ones included (so a growing
            fraction over a schedule removes heads gradually).
        model: when given, `already_pruned` and `group_size` default to what the model records.
        already_pruned: {layer: [original head indices]} already removed.
        group_size: query heads that go together (grouped-query attention); groups are ranked by summed importance.
        min_heads_per_layer: heads every layer keeps (0: a layer may lose all heads). With `model`, at least what
            the model needs (a T5 block keeps one head for the position bias it hands on).
        allow_remove_all: by default at least one head (group) stays in the model.
        layer_budget: {layer: heads to be gone in that layer, already removed ones included} (e.g. from
            `hf_prune.allocate_units`): each layer loses exactly its budget, its lowest-importance heads first
            (layers not named: none). `fraction` may then be None; when given, the budget must add up to it.

    Returns:
        {layer: sorted original head indices}, the complete set to be gone (already removed included); pass it to
        `prune_heads`, which ignores the heads already removed.
    """
    if model is not None:
        summary = structure_summary(model)
        already_pruned = summary["pruned_heads"] if already_pruned is None else already_pruned
        group_size = summary["head_group_size"] if group_size is None else group_size
        min_heads_per_layer = max(min_heads_per_layer, min_heads_per_block(model))
    scores = {layer: importance[layer].detach().float().cpu() for layer in range(importance.shape[0])}
    already = {int(k): {int(h) for h in v} for k, v in (already_pruned or {}).items()}
    return select_units(scores, fraction, already, group_size or 1, min_heads_per_layer, allow_remove_all, "heads",
                        layer_budget)


def select_neurons_to_prune(
    importance: Mapping[int, torch.Tensor],
    fraction: Optional[float] = None,
    *,
    model: Optional[nn.Module] = None,
    already_pruned: Optional[Mapping[int, Iterable[int]]] = None,
    min_neurons_per_layer: int = 0,
    allow_remove_all: bool = False,
    layer_budget: Optional[Mapping[int, int]] = None,
) -> dict[int, list[int]]:
    """The FFN neurons to be gone so that `fraction` of all neurons is removed, lowest importance first, globally.

    Same conventions as `select_heads_to_prune`: `importance` from `compute_neuron_importance`, original numbering,
    already removed neurons count towards `fraction` and are part of the result, at least one neuron stays in the
    model unless `allow_remove_all`; `layer_budget` ({layer: neurons to be gone}) sets each layer's count instead.
    """
    if model is not None and already_pruned is None:
        already_pruned = structure_summary(model)["pruned_neurons"]
    scores = {int(layer): row.detach().float().cpu() for layer, row in importance.items()}
    already = {int(k): {int(n) for n in v} for k, v in (already_pruned or {}).items()}
    chosen = select_units(scores, fraction, already, 1, min_neurons_per_layer, allow_remove_all, "neurons",
                          layer_budget)
    return even_fused_experts(model, chosen, scores, already) if model is not None else chosen


def even_fused_experts(
    model: nn.Module, chosen: dict[int, list[int]], scores: Mapping[int, torch.Tensor], already: dict[int, set[int]]
) -> dict[int, list[int]]:
    """Make a neuron selection removable from mixture-of-experts layers whose experts are one tensor.

    Transformers 5 stores a layer's routed experts as 3D tensors, so every expert keeps the same number of neurons,
    in rows of a multiple of 16 bytes (torch's grouped matrix product). In each such layer every routed expert keeps
    the mean number the selection left them, rounded to that multiple (at least one multiple): its highest-scoring
    neurons, never one already chosen before (`already`: removal stays monotone). Other layers, and the shared
    expert, keep the selection as it is.
    """
    _, view = find_layers(model)
    result = {layer: set(units) for layer, units in chosen.items()}
    for i, layer in enumerate(view):
        moe = view.layout(i).moe
        if moe is None or not experts_are_fused(moe, layer) or i not in scores:
            continue
        size, gone = expert_size(moe, layer), result.get(i, set())
        removed, before = moe_pruned_neurons(moe, layer), already.get(i, set())
        present = {e: [e * size + n for n in range(size) if e * size + n not in removed]
                   for e in kept_experts_of(moe, layer)}
        left = [sum(1 for n in units if n not in gone) for units in present.values()]
        element = getattr(get_module(layer, moe.experts), moe.fused_down).element_size()
        multiple = 16 // math.gcd(16, element)
        keep = max(multiple, int(round(sum(left) / len(left) / multiple)) * multiple)
        available = {e: [n for n in units if n not in before] for e, units in present.items()}
        keep = min([keep, *(len(units) for units in available.values())])
        row = scores[i]
        for e, units in available.items():
            ranked = sorted(units, key=lambda n: float(row[n]), reverse=True)
            gone = (gone - set(present[e])) | (set(present[e]) - set(ranked[:keep]))
        result[i] = gone
    return {layer: sorted(units) for layer, units in sorted(result.items()) if units}

