"""Comparisons of pruned models: accuracy against sparsity or latency, and the sensitivity of each group."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from transformers.utils import logging

from . import canvas
from .canvas import clamp, draw_heatmap, finite_number, mean_or_nan, new_figure, save_figure, signed_format

logger = logging.get_logger(__name__)

_MARKERS = {("pytorch", "fp32"): "o", ("onnxruntime", "fp32"): "s", ("onnxruntime", "fp32 O2"): "D",
            ("onnxruntime", "int8"): "^"}


# ------------------------------------------------------------------------------------------------ accuracy vs sparsity
def accuracy_groups(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[float, list[float]]]:
    """{label (or arm): {sparsity: [accuracies]}}, labels in first-seen order; ValueError naming the bad row."""
    if not rows:
        raise ValueError("rows is empty: give at least one {'sparsity': ..., 'accuracy': ...} row.")
    groups: dict[str, dict[float, list[float]]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}] must be a dict with 'sparsity' and 'accuracy', got {type(row).__name__}.")
        sparsity, accuracy = (finite_number(row.get(key), f"rows[{i}]['{key}']") for key in ("sparsity", "accuracy"))
        if not (0.0 <= sparsity <= 1.0 and 0.0 <= accuracy <= 1.0):
            raise ValueError(f"rows[{i}]: sparsity and accuracy are fractions in [0, 1], got {sparsity}, {accuracy}.")
        label = str(row.get("label", row.get("arm", "")))
        groups.setdefault(label, {}).setdefault(sparsity, []).append(accuracy)
    return groups


def plot_accuracy_vs_sparsity(rows: Sequence[Mapping[str, Any]], path: str) -> Optional[str]:
    """Accuracy over sparsity, one line per `label` (or `arm`) through the mean at each sparsity, every run a dot:
    how much accuracy each method keeps as sparsity grows (the line that stays high furthest right wins)."""
    groups = accuracy_groups(rows)
    figure = new_figure(7.5, 4.5, path)
    if figure is None:
        return None
    from matplotlib import colormaps

    axes = figure.add_subplot()
    for i, (label, points) in enumerate(groups.items()):
        color = colormaps["tab10"](i % 10)
        xs = sorted(points)
        axes.plot([100 * x for x in xs], [100 * mean_or_nan(points[x]) for x in xs], "-", color=color,
                  label=label or None, linewidth=1.6)
        runs = [(x, accuracy) for x in xs for accuracy in points[x]]
        axes.scatter([100 * x for x, _ in runs], [100 * a for _, a in runs], color=color, s=18, alpha=0.7)
    axes.set_xlabel("sparsity (%)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Accuracy vs sparsity")
    axes.grid(True, alpha=0.3)
    if any(groups):
        axes.legend(fontsize=7)
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------------------ accuracy vs latency
def plot_accuracy_latency(results: dict[str, Any], path: str) -> Optional[str]:
    """Accuracy against p50 latency at the largest batch size, one point per arm; returns `path`, or None.

    Returns None (with a warning) when matplotlib is not installed or no arm has an accuracy.
    """
    rows = [r for r in results["rows"] if r.get("accuracy") is not None]
    if not rows:
        return None
    if not canvas.is_matplotlib_available():
        logger.warning("hf_prune: matplotlib is not installed (pip install 'hf_prune[plot]'); no benchmark.png.")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(results["settings"]["batch_sizes"])
    names = list(dict.fromkeys(r["name"] for r in rows))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    figure, axes = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    for r in rows:
        key = (r["runtime"], r["precision"])
        axes.scatter(r[f"p50_ms_b{batch}"], r["accuracy"] * 100, marker=_MARKERS.get(key, "x"), s=70,
                     color=colors[r["name"]], edgecolors="black", linewidths=0.5)
    # Two legends instead of point labels, which collide when arms sit close together: colour = checkpoint,
    # marker = runtime and precision.
    checkpoints = [axes.scatter([], [], marker="o", color=colors[name], label=name) for name in names]
    first = axes.legend(handles=checkpoints, title="checkpoint", fontsize=7, title_fontsize=7,
                        loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.add_artist(first)
    runtimes = [axes.scatter([], [], marker=m, color="grey", label=f"{k[0]} {k[1]}") for k, m in _MARKERS.items()]
    axes.legend(handles=runtimes, title="runtime", fontsize=7, title_fontsize=7, loc="lower left",
                bbox_to_anchor=(1.01, 0.0))
    axes.set_xscale("log")
    axes.set_xlabel(f"p50 latency at batch {batch} (ms, log scale)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Accuracy vs latency (up and left is better)")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    # "tight" also keeps labels that tight_layout leaves outside the canvas (a colorbar's label).
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ sensitivity
def sensitivity_grid(sensitivity: Mapping[str, Any]) -> tuple[list[str], list[float], list[list[float]]]:
    """Groups (by layer, then kind, then name; groups without a layer last), levels (ascending) and the mean delta of
    each (group, level) cell (NaN where none was measured), from the dict a sensitivity analysis serialises to."""
    rows = sensitivity.get("rows") if isinstance(sensitivity, Mapping) else None
    if not rows:
        raise ValueError("sensitivity must be a dict with a non-empty 'rows' list of {'group', 'level', 'delta', ...}.")
    cells: dict[tuple[str, float], list[float]] = {}
    order: dict[str, tuple] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "group" not in row:
            raise ValueError(f"sensitivity['rows'][{i}] must be a dict with a 'group', got {row!r}.")
        level = finite_number(row.get("level"), f"sensitivity['rows'][{i}]['level']")
        delta = finite_number(row.get("delta"), f"sensitivity['rows'][{i}]['delta']")
        group, layer = str(row["group"]), row.get("layer")
        order.setdefault(group, (layer is None, layer if layer is not None else 0, str(row.get("kind", "")), group))
        cells.setdefault((group, level), []).append(delta)
    groups = sorted(order, key=order.__getitem__)
    levels = sorted({level for _, level in cells})
    return groups, levels, [[mean_or_nan(cells.get((group, level))) for level in levels] for group in groups]


def short_names(names: Sequence[str]) -> tuple[str, list[str]]:
    """The dotted module-path prefix all `names` share (but the last shared part, e.g. "layer"), and the names
    without it: "bert.encoder.layer.0.attention" -> ("bert.encoder.", "layer.0.attention")."""
    parts = [name.split(".") for name in names]
    shared = 0
    while len(names) > 1 and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    prefix = ".".join(parts[0][: max(shared - 1, 0)]) + ("." if shared > 1 else "")
    return prefix, [name[len(prefix):] for name in names]


def plot_sensitivity(sensitivity: Mapping[str, Any], path: str) -> Optional[str]:
    """Heatmap of a sensitivity analysis: rows are groups (by layer, then kind), columns pruning levels, colour and
    annotation the metric's change from the unpruned baseline, red where the metric got worse and blue where it
    got better (by `higher_is_better`, default True; a loss has it False), on a scale symmetric around 0. Pale rows
    are groups that take pruning well and can be pruned harder."""
    groups, levels, grid = sensitivity_grid(sensitivity)
    baseline, metric = sensitivity.get("baseline"), str(sensitivity.get("metric") or "metric")
    prefix, names = short_names(groups)
    fractions = all(0.0 <= level <= 1.0 for level in levels)
    columns = [f"{level:.0%}" if fractions else f"{level:g}" for level in levels]
    limit = max((abs(v) for row in grid for v in row if not math.isnan(v)), default=0.0)
    width = 3.5 + 0.75 * len(levels) + 0.07 * max(len(name) for name in names)
    figure = new_figure(clamp(width, 6.5, 18), clamp(1.8 + 0.3 * len(groups), 3, 24), path)
    if figure is None:
        return None
    axes = figure.add_subplot()
    label = f"{metric} change" + (f" (baseline {baseline:.4g})" if isinstance(baseline, (int, float)) else "")
    cmap = "RdBu" if sensitivity.get("higher_is_better", True) else "RdBu_r"
    draw_heatmap(figure, axes, grid, names, columns, cmap=cmap, vmin=-(limit or 1e-9), vmax=limit or 1e-9,
                 label=label, fmt=signed_format(limit), annotate=len(groups) * len(levels) <= 600)
    axes.set_xlabel("pruning level")
    axes.set_ylabel(f"group (under {prefix})" if prefix else "group")
    axes.set_title(f"Sensitivity: {metric} change when one group is pruned\n(red: worse, blue: better)",
                   fontsize=10)
    return save_figure(figure, path)
