"""Non-uniform sparsity: how much of each module (or layer) to prune, from measured sensitivity curves.

Pruning every layer to the same sparsity treats a layer whose loss explodes at 50% like one that does not care at
90%. Layer-wise sensitivity analysis (Han et al. 2015, "Learning both Weights and Connections"; the per-layer
curves of Distiller and NVIDIA's ASP) prunes the robust layers harder and the fragile ones less at the same global
budget. `allocate_sparsity` turns curves from `hf_prune.analyze_sensitivity` into a plan that:

- meets the global target over the planned weights exactly: sum(sparsity_i * numel_i) / sum(numel_i) equals the
  target, and the per-module counts `round(sparsity_i * numel_i)` that the engine prunes add up to the count a global
  target prunes, `round(target * total)`;
- respects `min_sparsity <= sparsity_i <= max_sparsity`;
- is a `PruningConfig.sparsity_overrides` mapping, one anchored, escaped regex per module (`module_pattern`).

How. Each group's curve (metric damage over pruning level, with no damage at level 0, made non-decreasing so that
noise cannot invert it) is interpolated linearly, extended past the last measured level with its last slope. For a
tolerated damage tau every group takes the largest sparsity whose interpolated damage stays within tau; bisection on
tau finds where the parameter-weighted mean crosses the target, the gap between the two sides of a plateau is closed
by moving every group the same fraction of its step, and whole weights settle the last fraction of a weight.

`allocate_units` does the same for attention heads and FFN neurons (counts per layer, for
`select_heads_to_prune(..., layer_budget=...)`). This module is plain arithmetic: no model, no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

# How a module's own regex in `sparsity_overrides` looks: the escaped name between anchors, so `layer.1.` never
# matches `layer.11.` and every override hits exactly one module.
_PATTERN = re.compile(r"\^(.*)\$")
# Bisection steps on the tolerated damage: enough to pin it far below any metric's resolution.
_BISECTION_STEPS = 200
# A module's share of the target's last fraction of a weight stays below half a weight, so the engine's
# round(sparsity * numel) still lands on the planned count.
_HALF_WEIGHT = 0.49

Curve = tuple[list[float], list[float]]  # (levels, damages), levels ascending from 0, damages non-decreasing


def module_pattern(name: str) -> str:
    """The `sparsity_overrides` key that matches the module `name` and nothing else: `^<re.escape(name)>$`."""
    return "^" + re.escape(name) + "$"


def module_name(pattern: str) -> Optional[str]:
    """The module name a `module_pattern` key stands for, or None for any other regex."""
    match = _PATTERN.fullmatch(pattern)
    if match is None:
        return None
    return re.sub(r"\\(.)", r"\1", match.group(1), flags=re.DOTALL)


def _fail(function: str, option: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{function}: {option}={value!r} is invalid: {allowed}.")


def check_bounds(
    function: str, target: float, lower: float, upper: float, names: Sequence[str], allow_one: bool = False
) -> None:
    """Raise ValueError, naming the option, its value and the allowed range, when the target or bounds are unusable.

    `names` are the three option names (target, lower bound, upper bound) in the caller's wording; `allow_one` lets
    the upper bound be 1 (a layer may lose all its heads; no weight sparsity may be 1 in `PruningConfig`).
    """
    target_name, lower_name, upper_name = names
    for option, value in zip(names, (target, lower, upper)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            _fail(function, option, value, "give a number")
    if not 0.0 <= lower < 1.0:
        _fail(function, lower_name, lower, "must lie in [0, 1)")
    if allow_one and not 0.0 < upper <= 1.0:
        _fail(function, upper_name, upper, "must lie in (0, 1]")
    if not allow_one and not 0.0 < upper < 1.0:
        _fail(function, upper_name, upper, "must lie in (0, 1): PruningConfig refuses a sparsity of 1")
    if lower > upper:
        _fail(function, lower_name, lower, f"must not exceed {upper_name}={upper}")
    if not lower <= target <= upper:
        _fail(function, target_name, target,
              f"with {lower_name}={lower} and {upper_name}={upper} it must lie in [{lower}, {upper}]")


# ------------------------------------------------------------------------------------------------ curves
def make_curve(points: Sequence[tuple[float, float]]) -> Curve:
    """(level, damage) points -> a curve from (0, 0), levels ascending (repeats averaged), damage non-decreasing."""
    by_level: dict[float, list[float]] = {}
    for level, damage in points:
        by_level.setdefault(float(level), []).append(float(damage))
    levels, damages = [0.0], [0.0]
    for level in sorted(by_level):
        if level <= 0.0:
            continue
        values = by_level[level]
        levels.append(level)
        damages.append(max(damages[-1], sum(values) / len(values)))
    return levels, damages


def sparsity_within(curve: Curve, tau: float) -> float:
    """The largest level whose interpolated damage is at most `tau` (inf when the curve never exceeds it)."""
    levels, damages = curve
    if tau < damages[0]:
        return -math.inf
    j = max(i for i, d in enumerate(damages) if d <= tau)
    if j == len(levels) - 1:
        if j == 0:
            return math.inf  # a curve with no measured level: nothing says the group is sensitive
        slope = (damages[j] - damages[j - 1]) / (levels[j] - levels[j - 1])
        return math.inf if slope <= 0 else levels[j] + (tau - damages[j]) / slope
    return levels[j] + (tau - damages[j]) * (levels[j + 1] - levels[j]) / (damages[j + 1] - damages[j])


def solve_tolerance(
    curves: Sequence[Curve], weights: Sequence[float], target: float, lower: float, upper: float
) -> tuple[list[float], float]:
    """Per-curve sparsities in [lower, upper] with weighted mean `target` that prune the least sensitive most.

    Returns the sparsities and the tolerated damage tau they correspond to (the bisection's upper end).
    """
    total = float(sum(weights))

    def at(tau: float) -> list[float]:
        return [min(max(sparsity_within(c, tau), lower), upper) for c in curves]

    def mean(values: Sequence[float]) -> float:
        return sum(v * w for v, w in zip(values, weights)) / total

    low = -1.0
    high = max((sparsity_damage(c, upper) for c in curves), default=0.0) + 1.0
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if mean(at(middle)) < target:
            low = middle
        else:
            high = middle
    below, above = at(low), at(high)
    below_mean, above_mean = mean(below), mean(above)
    # A plateau (or tau's resolution) leaves a gap: every curve moves the same fraction of its own step across it.
    alpha = 0.0 if above_mean <= below_mean else (target - below_mean) / (above_mean - below_mean)
    alpha = min(max(alpha, 0.0), 1.0)
    return [b + alpha * (a - b) for a, b in zip(above, below)], high


def sparsity_damage(curve: Curve, level: float) -> float:
    """The curve's interpolated (and linearly extended) damage at `level`."""
    levels, damages = curve
    if len(levels) == 1:
        return 0.0
    if level >= levels[-1]:
        slope = (damages[-1] - damages[-2]) / (levels[-1] - levels[-2])
        return damages[-1] + max(slope, 0.0) * (level - levels[-1])
    j = max(i for i, x in enumerate(levels) if x <= level)
    return damages[j] + (level - levels[j]) * (damages[j + 1] - damages[j]) / (levels[j + 1] - levels[j])


# ------------------------------------------------------------------------------------------------ exactness
def exact_counts(
    sparsities: Mapping[str, float], sizes: Mapping[str, int], target: float, lower: float, upper: float,
    function: str = "allocate_sparsity",
) -> dict[str, int]:
    """Whole numbers of pruned weights per module, close to `sparsities`, within the bounds, that add up to
    `round(target * total)`: what a global target would prune (`select_lowest`'s count). Largest remainders first."""
    total = sum(sizes.values())
    wanted = int(round(target * total))
    low = {n: math.ceil(lower * sizes[n] - 1e-9) for n in sizes}
    high = {n: math.floor(upper * sizes[n] + 1e-9) for n in sizes}
    if not sum(low.values()) <= wanted <= sum(high.values()):
        _fail(function, "target_sparsity", target,
              f"{wanted} of the {total} planned weights cannot be pruned in whole weights per module within the "
              f"bounds [{lower}, {upper}] (reachable: {sum(low.values())}..{sum(high.values())} weights); widen them")
    exact = {n: sparsities[n] * sizes[n] for n in sizes}
    counts = {n: min(max(math.floor(exact[n] + 1e-9), low[n]), high[n]) for n in sizes}
    missing = wanted - sum(counts.values())
    step = 1 if missing > 0 else -1
    while missing:
        # Largest remainders gain a weight first (smallest lose one first); those at a bound are skipped.
        movable = [n for n in sizes if (counts[n] < high[n] if step > 0 else counts[n] > low[n])]
        movable.sort(key=lambda n: (exact[n] - counts[n]) * step, reverse=True)
        for name in movable[: abs(missing)]:
            counts[name] += step
            missing -= step
    return counts


def spread_remainder(
    counts: Mapping[str, int], sizes: Mapping[str, int], target: float, lower: float, upper: float
) -> dict[str, float]:
    """Sparsities `count / numel`, each nudged by under half a weight so that their weighted mean is `target` to
    float precision while `round(sparsity * numel)` still gives `count`. The nudge is shared in proportion to size
    among the modules the bounds leave room in."""
    total = sum(sizes.values())
    remainder = target * total - sum(counts.values())  # in weights, |remainder| <= 0.5
    share = {n: 0.0 for n in sizes}
    for _ in range(len(sizes) + 1):
        if abs(remainder) < 1e-12:
            break
        room = {}
        for n in sizes:
            if remainder > 0:
                room[n] = min(_HALF_WEIGHT, upper * sizes[n] - counts[n]) - share[n]
            else:
                room[n] = min(_HALF_WEIGHT, counts[n] - lower * sizes[n]) + share[n]
        free = {n: r for n, r in room.items() if r > 1e-12}
        if not free:
            break  # no module has room: the mean stays within half a weight of the target
        free_size = sum(sizes[n] for n in free)
        moved = 0.0
        for n, r in free.items():
            amount = min(abs(remainder) * sizes[n] / free_size, r)
            share[n] += math.copysign(amount, remainder)
            moved += amount
        remainder -= math.copysign(moved, remainder)
    return {n: (counts[n] + share[n]) / sizes[n] for n in sizes}


def exact_overrides(
    sparsities: Mapping[str, float], sizes: Mapping[str, int], target: float, lower: float, upper: float,
    function: str = "allocate_sparsity",
) -> dict[str, float]:
    """`sparsity_overrides` ({module_pattern(name): sparsity}) for a per-module plan, made exact (see the module
    docstring): the weighted mean is `target` and the engine's per-module counts add up to the global count."""
    counts = exact_counts(sparsities, sizes, target, lower, upper, function)
    final = spread_remainder(counts, sizes, target, lower, upper)
    return {module_pattern(name): final[name] for name in sizes}


def plan_sparsities(overrides: Mapping[str, float]) -> dict[str, float]:
    """{module name: sparsity} of a `sparsity_overrides` mapping made by `allocate_sparsity` / `owl_sparsity`."""
    plan = {}
    for pattern, value in overrides.items():
        name = module_name(pattern)
        if name is None:
            raise ValueError(f"plan_sparsities: key {pattern!r} is not a single-module pattern ('^name$').")
        plan[name] = float(value)
    return plan


def weighted_sparsity(sparsities: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """sum(sparsity_i * numel_i) / sum(numel_i) over the modules of `sparsities`."""
    total = sum(sizes[n] for n in sparsities)
    return sum(sparsities[n] * sizes[n] for n in sparsities) / total


# ------------------------------------------------------------------------------------------------ sensitivity input
def _as_dict(sensitivity: Any) -> dict[str, Any]:
    if hasattr(sensitivity, "to_dict"):
        return sensitivity.to_dict()
    if isinstance(sensitivity, Mapping) and "rows" in sensitivity:
        return dict(sensitivity)
    raise TypeError("sensitivity: give the result of hf_prune.analyze_sensitivity (or its to_dict() / from_json), "
                    f"got {type(sensitivity).__name__}.")


def group_curves(sensitivity: Any, kind: str, function: str) -> tuple[dict[str, Curve], dict[str, dict[str, Any]]]:
    """{group: curve of damage (worse is positive, whatever the metric's direction)} and the group records of one
    kind."""
    data = _as_dict(sensitivity)
    sign = -1.0 if data.get("higher_is_better") else 1.0
    groups = {name: info for name, info in (data.get("groups") or {}).items() if info.get("kind") == kind}
    points: dict[str, list[tuple[float, float]]] = {}
    for row in data["rows"]:
        if row.get("kind") == kind:
            points.setdefault(row["group"], []).append((row["level"], sign * row["delta"]))
    if not points:
        kinds = sorted({row.get("kind") for row in data["rows"]})
        _fail(function, "kind", kind, f"the sensitivity has no rows of that kind; it has {kinds}")
    missing = sorted(set(points) - set(groups))
    if missing:
        raise ValueError(f"{function}: the sensitivity lists no modules for the group(s) {missing[:4]}; run "
                         "hf_prune.analyze_sensitivity again (its results carry a 'groups' table).")
    return {name: make_curve(p) for name, p in points.items()}, groups


ALLOCATION_KINDS = ("linear", "layer")


def allocate_sparsity(
    sensitivity: Any,
    target_sparsity: float,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    kind: str = "linear",
) -> dict[str, float]:
    """Per-module sparsity that meets `target_sparsity` exactly and prunes sensitive modules less.

    Args:
        sensitivity: what `hf_prune.analyze_sensitivity` returned (or its `to_dict()`, or
            `SensitivityResult.from_json(path)`), with rows of `kind`.
        target_sparsity: fraction of all planned weights to prune (the modules of the `kind` groups), in
            [min_sparsity, max_sparsity].
        min_sparsity / max_sparsity: bounds on every module's sparsity (max below 1: `PruningConfig` refuses 1).
        kind: "linear" (one curve per Linear, the default) or "layer" (one curve per transformer layer, every
            Linear of the layer gets the layer's sparsity, OWL-style).

    Returns:
        `{"^<escaped module name>$": sparsity}` for `PruningConfig(target_sparsity=target_sparsity,
        sparsity_overrides=...)`: every planned module matched by exactly one key. The weighted mean is
        `target_sparsity` (float precision) and the per-module weight counts the engine prunes add up to
        `round(target_sparsity * total)`. `plan_sparsities(result)` reads the plan back by module name.

    Raises:
        ValueError: naming the option, its value and the allowed range, for a target outside the bounds, bounds
            outside [0, 1) or a kind the sensitivity has no rows of.
    """
    function = "allocate_sparsity"
    check_bounds(function, target_sparsity, min_sparsity, max_sparsity,
                 ("target_sparsity", "min_sparsity", "max_sparsity"))
    if kind not in ALLOCATION_KINDS:
        _fail(function, "kind", kind, f"choose one of {list(ALLOCATION_KINDS)} (groups that cover every planned "
              "module once)")
    curves, groups = group_curves(sensitivity, kind, function)
    names = list(curves)
    weights = [float(groups[g]["params"]) for g in names]
    levels, _ = solve_tolerance([curves[g] for g in names], weights, target_sparsity, min_sparsity, max_sparsity)
    sparsities: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for group, level in zip(names, levels):
        for module, numel in groups[group]["modules"].items():
            if module in sizes:
                raise ValueError(f"{function}: module {module!r} belongs to two {kind} groups; give a sensitivity "
                                 "whose groups of that kind do not overlap.")
            sparsities[module], sizes[module] = level, int(numel)
    return exact_overrides(sparsities, sizes, target_sparsity, min_sparsity, max_sparsity, function)


UNIT_KINDS = ("heads", "neurons")


def allocate_units(
    sensitivity: Any,
    fraction: float,
    kind: str = "heads",
    min_fraction: float = 0.0,
    max_fraction: float = 1.0,
) -> dict[int, int]:
    """How many heads (or FFN neurons) each layer should lose so that `fraction` of all of them go, fewer where
    removing them hurts more.

    Args:
        sensitivity: `hf_prune.analyze_sensitivity` results with rows of kind "heads" (or "neurons"): one curve per
            layer over the fraction of that layer's units removed.
        fraction: fraction of all units of the model to remove, in [min_fraction, max_fraction].
        kind: "heads" or "neurons".
        min_fraction / max_fraction: bounds on each layer's fraction removed.

    Returns:
        {layer index: number of units to be gone}, in whole key/value groups under grouped-query attention, adding up
        to what `select_heads_to_prune(importance, fraction)` removes; pass it as `layer_budget=` to
        `select_heads_to_prune` / `select_neurons_to_prune`.
    """
    function = "allocate_units"
    if kind not in UNIT_KINDS:
        _fail(function, "kind", kind, f"choose one of {list(UNIT_KINDS)}")
    check_bounds(function, fraction, min_fraction, max_fraction, ("fraction", "min_fraction", "max_fraction"),
                 allow_one=True)
    curves, groups = group_curves(sensitivity, kind, function)
    names = list(curves)
    group_size = max(int(groups[g].get("group_size", 1)) for g in names)
    units = [int(groups[g]["units"]) // group_size for g in names]  # in whole key/value groups
    levels, _ = solve_tolerance([curves[g] for g in names], [float(u) for u in units], fraction, min_fraction,
                                max_fraction)
    keys = [str(i) for i in range(len(names))]
    counts = exact_counts(dict(zip(keys, levels)), dict(zip(keys, units)), fraction, min_fraction, max_fraction,
                          function)
    return {int(groups[g]["layer"]): counts[k] * group_size for g, k in zip(names, keys)}

