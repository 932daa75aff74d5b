"""Figures for benchmark results (matplotlib is the optional `plot` extra)."""

from __future__ import annotations

from typing import Any, Optional

from transformers.utils import logging

logger = logging.get_logger(__name__)

_MARKERS = {("pytorch", "fp32"): "o", ("onnxruntime", "fp32"): "s", ("onnxruntime", "int8"): "^"}


def is_matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


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
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for r in rows:
        key = (r["runtime"], r["precision"])
        axes.scatter(r[f"p50_ms_b{batch}"], r["accuracy"] * 100, marker=_MARKERS.get(key, "x"), s=60,
                     color=colors[r["name"]], edgecolors="black", linewidths=0.5)
        axes.annotate(f"{r['name']}\n{r['runtime']} {r['precision']}", (r[f"p50_ms_b{batch}"], r["accuracy"] * 100),
                      textcoords="offset points", xytext=(5, 4), fontsize=6)
    for key, marker in _MARKERS.items():
        axes.scatter([], [], marker=marker, color="grey", label=f"{key[0]} {key[1]}")
    axes.set_xscale("log")
    axes.set_xlabel(f"p50 latency at batch {batch} (ms, log scale)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Accuracy vs latency (up and left is better)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
