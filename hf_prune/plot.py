"""Figures for benchmark results (matplotlib is the optional `plot` extra)."""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

from transformers.utils import logging

logger = logging.get_logger(__name__)

_MARKERS = {("pytorch", "fp32"): "o", ("onnxruntime", "fp32"): "s", ("onnxruntime", "fp32 O2"): "D",
            ("onnxruntime", "int8"): "^"}


def is_matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_accuracy_latency(results: dict[str, Any], path: str) -> Optional[str]:
    """Accuracy against p50 latency at the largest batch size, one point per arm; returns `path`, or None.

    Returns None (with a warning) when matplotlib is not installed or no arm has an accuracy.
    """
    rows = [r for r in results["rows"] if r.get("accuracy") is not None]
    if not rows:
        return None
    if not is_matplotlib_available():
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
    figure.savefig(path)
    plt.close(figure)
    return path
