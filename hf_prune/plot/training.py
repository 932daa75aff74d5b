"""A pruning run over time: the sparsity schedule against the eval metric, and the pictures written after training."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from transformers.utils import logging

from . import canvas
from .canvas import new_figure, save_figure
from .sparsity import ReportOrModel, plot_layer_sparsity

logger = logging.get_logger(__name__)

# Keys `Pruner.log_metrics` adds to every Trainer log, in drawing order (the thin dashed schedule over the thick
# measured line, so both show where they coincide): label and matplotlib line options of each.
SCHEDULE_KEYS = {
    "sparsity": ("reached (weights)", {"color": "tab:blue", "linewidth": 2.6, "alpha": 0.7}),
    "scheduled_sparsity": ("scheduled", {"color": "black", "linestyle": "--", "linewidth": 1.2}),
    "heads_pruned": ("heads removed", {"color": "tab:green", "linestyle": ":", "linewidth": 1.8}),
    "neurons_pruned": ("neurons removed", {"color": "tab:purple", "linestyle": "-.", "linewidth": 1.6}),
}


def logged_series(log_history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in a Trainer log history, one per step (the last logged), in step order."""
    points = {int(entry["step"]): float(entry[key]) for entry in log_history
              if "step" in entry and isinstance(entry.get(key), (int, float))}
    return sorted(points.items())


def plot_schedule(log_history: Sequence[Mapping[str, Any]], path: str, metric: str = "eval_accuracy") -> Optional[str]:
    """Sparsity over optimizer steps: scheduled (dashed) and measured on the weights (solid), heads / neurons removed
    when structured pruning ran, and `metric` (or `eval_<metric>`) on the right axis where logged. The reached line
    sits on the scheduled one between mask updates; a metric that drops where sparsity climbs fastest says the
    schedule is too steep for the learning rate or the number of steps."""
    if not log_history:
        raise ValueError("log_history is empty: pass trainer.state.log_history after training.")
    series = {key: points for key in SCHEDULE_KEYS if (points := logged_series(log_history, key))}
    if not series:
        raise ValueError(f"log_history has no {' / '.join(SCHEDULE_KEYS)} entries: was it logged by PruningTrainer "
                         "(or a Trainer with an hf_prune callback) with logging enabled?")
    name = metric if logged_series(log_history, metric) or metric.startswith("eval_") else f"eval_{metric}"
    scores = logged_series(log_history, name)
    figure = new_figure(8.5, 4.5, path)
    if figure is None:
        return None
    axes = figure.add_subplot()
    handles = []
    for key, points in series.items():
        label, style = SCHEDULE_KEYS[key]
        handles += axes.plot([s for s, _ in points], [100 * v for _, v in points], label=label, **style)
    axes.set_ylim(0, 105)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("sparsity (%)")
    axes.grid(True, alpha=0.3)
    if scores:
        right = axes.twinx()
        handles += right.plot([s for s, _ in scores], [v for _, v in scores], "o-", color="tab:red", label=name,
                              markersize=4)
        right.set_ylabel(name, color="tab:red")
    axes.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(handles),
                frameon=False)
    axes.set_title("Sparsity schedule" + (f" and {name}" if scores else ""))
    return save_figure(figure, path)


def plot_training(log_history: Sequence[Mapping[str, Any]], report_or_model: ReportOrModel, directory: str,
                  metric: str = "eval_accuracy") -> dict[str, str]:
    """`directory/schedule.png` (`plot_schedule`) and `directory/layer_sparsity.png` (`plot_layer_sparsity`) after
    a pruning run; returns {"schedule": path, "layer_sparsity": path} for those written. Never raises for a picture:
    without matplotlib, or with input a picture cannot be drawn from, it warns once and writes what it can, so the
    training it follows keeps its result."""
    if not canvas.is_matplotlib_available():
        logger.warning(f"hf_prune: {canvas.INSTALL_HINT}; no plots in {directory}.")
        return {}
    drawers = {"schedule": lambda p: plot_schedule(log_history, p, metric),
               "layer_sparsity": lambda p: plot_layer_sparsity(report_or_model, p)}
    written = {}
    for name, draw in drawers.items():
        try:
            path = draw(os.path.join(directory, f"{name}.png"))
        except ValueError as error:
            logger.warning(f"hf_prune: no {name}.png: {error}")
            continue
        if path:
            written[name] = path
    return written
