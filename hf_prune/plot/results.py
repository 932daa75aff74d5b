"""Comparisons of pruned models: accuracy against sparsity or latency, the sensitivity of each group, and the shapes
`hf-prune optimize` tried on a causal LM."""

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


# ------------------------------------------------------------------------------------------------ causal-LM candidates
# One marker per family of candidate shapes (`axes` in the report); families not listed take the spare markers.
_AXES_MARKERS = {"heads+neurons": "o", "hidden": "s", "hidden+heads+neurons": "D", "depth": "v", "depth+width": "^"}
_SPARE_MARKERS = ("P", "X", "<", ">", "h", "p")


def optional_number(value: Any, where: str) -> Optional[float]:
    """None for None, else `value` as a finite float (ValueError naming `where`)."""
    return None if value is None else finite_number(value, where)


def lm_candidate_points(report: Mapping[str, Any]) -> tuple[list[dict], dict[str, dict], dict[str, Optional[float]]]:
    """(candidates, models, target) of an `hf-prune optimize` causal-LM report, checked and reduced to what the
    picture draws: a candidate's perplexity is the one after the short search recovery when measured, else the one
    right after the cut; missing values are None. ValueError naming the bad entry."""
    if not isinstance(report, Mapping) or not isinstance(report.get("candidates"), Sequence):
        raise ValueError("report must be the dict of an `hf-prune optimize` causal-LM run, with a 'candidates' list.")
    candidates = []
    for i, row in enumerate(report["candidates"]):
        where = f"report['candidates'][{i}]"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(row).__name__}.")
        after_search = optional_number(row.get("perplexity_after_search"), f"{where}['perplexity_after_search']")
        candidates.append({
            "axes": str(row.get("axes") or "heads+neurons"),
            "params_ratio": finite_number(row.get("params_ratio"), f"{where}['params_ratio']"),
            "decode_speedup": optional_number(row.get("decode_speedup"), f"{where}['decode_speedup']"),
            "perplexity": after_search if after_search is not None else
            optional_number(row.get("perplexity_after_cut"), f"{where}['perplexity_after_cut']"),
            "chosen": bool(row.get("chosen")),
        })
    models = {}
    for name, row in (report.get("models") or {}).items():
        where = f"report['models'][{name!r}]"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(row).__name__}.")
        models[name] = {key: optional_number(row.get(key), f"{where}[{key!r}]")
                        for key in ("params_ratio", "perplexity", "decode_speedup")}
    if "dense" in models:  # the reference: all of its parameters, its own speed
        models["dense"]["params_ratio"] = models["dense"]["params_ratio"] or 1.0
        models["dense"]["decode_speedup"] = 1.0
    if not candidates and not models:
        raise ValueError("report has no candidates and no models to draw.")
    target = report.get("target") or {}
    return candidates, models, {key: optional_number(target.get(key), f"report['target'][{key!r}]")
                                for key in ("params", "speedup")}


def _draw_lm_panel(axes, candidates: list[dict], models: dict[str, dict], value: str, styles: dict) -> int:
    """Candidates by family (the chosen one ringed), then the dense and optimized models, where `value` is
    measured; returns how many points were measured (the dense model's speedup, 1.0 by definition, is not, and is
    drawn only beside some that are)."""
    measured = 0
    for family, (marker, color) in styles.items():
        points = [c for c in candidates if c["axes"] == family and c[value] is not None]
        if points:
            axes.scatter([c["params_ratio"] for c in points], [c[value] for c in points], marker=marker, color=color,
                         s=40, alpha=0.85, label=family)
            measured += len(points)
    chosen = [c for c in candidates if c["chosen"] and c[value] is not None]
    if chosen:
        axes.scatter([c["params_ratio"] for c in chosen], [c[value] for c in chosen], s=190, facecolors="none",
                     edgecolors="black", linewidths=1.5, label="chosen")
    rows = {name: row for name, row in models.items()
            if name in ("dense", "optimized") and row["params_ratio"] is not None and row[value] is not None}
    measured += sum(name != "dense" or value != "decode_speedup" for name in rows)
    for name, marker, color, label in (("dense", "*", "black", "dense"),
                                       ("optimized", "P", "crimson", "optimized (recovered)")):
        if name in rows and measured:
            axes.scatter([rows[name]["params_ratio"]], [rows[name][value]], marker=marker, color=color, s=170,
                         edgecolors="white", linewidths=0.8, zorder=3, label=label)
    return measured


def plot_lm_candidates(report: Mapping[str, Any], path: str) -> Optional[str]:
    """The shapes `hf-prune optimize` tried on a causal LM (its report.json), against the fraction of parameters
    each keeps: held-out perplexity (log scale; after the cut, or after the short search recovery when measured) on
    the left, decode speedup at batch 1 on the right. One marker and colour per family of shapes (`axes`), the
    chosen candidate ringed, the dense and the recovered optimized model as a star and a cross, the targets dashed.
    Down-left (left panel) and up-left (right panel) is better. Returns `path`, or None without matplotlib."""
    candidates, models, target = lm_candidate_points(report)
    figure = new_figure(12.5, 4.8, path)
    if figure is None:
        return None
    from matplotlib import colormaps

    families = list(dict.fromkeys(c["axes"] for c in candidates))
    spare = iter(_SPARE_MARKERS * len(families))
    styles = {family: (_AXES_MARKERS.get(family) or next(spare), colormaps["tab10"](i % 10))
              for i, family in enumerate(families)}
    left, right = figure.subplots(1, 2, sharex=True)
    panels = ((left, "perplexity", "held-out perplexity", "no perplexity measured",
               "Perplexity vs size (down and left is better)"),
              (right, "decode_speedup", "decode speedup vs dense (batch 1)", "no decode speedup measured",
               "Decode speed vs size (up and left is better)"))
    for axes, value, ylabel, empty, title in panels:
        measured = _draw_lm_panel(axes, candidates, models, value, styles)
        if value == "perplexity" and target["params"] is not None:
            axes.axvline(target["params"], color="grey", linestyle="--", linewidth=1,
                         label=f"target: {target['params']:g} of the parameters")
        if value == "decode_speedup" and target["speedup"] is not None:
            axes.axhline(target["speedup"], color="grey", linestyle="--", linewidth=1,
                         label=f"target: {target['speedup']:g}x")
        if value == "perplexity" and measured:
            axes.set_yscale("log")
            ylabel += " (log scale)"
        if not measured:
            axes.text(0.5, 0.5, empty, transform=axes.transAxes, ha="center", va="center", color="grey")
        axes.set_xlabel("fraction of parameters kept")
        axes.set_ylabel(ylabel)
        axes.set_title(title, fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    return save_figure(figure, path)
