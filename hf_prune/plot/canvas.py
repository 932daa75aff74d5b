"""What every picture shares: the matplotlib probe, an Agg figure outside pyplot, saving, annotated heatmaps.

Callers go through `canvas.new_figure` (never a copy of the probe), so one place decides whether matplotlib is
there and says so once per picture.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable, Optional, Sequence

from transformers.utils import logging

logger = logging.get_logger(__name__)

DPI = 120
INSTALL_HINT = "matplotlib is not installed (pip install 'hf_prune[plot]')"


def is_matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def new_figure(width: float, height: float, path: str):
    """An Agg-backed matplotlib `Figure` of `width` x `height` inches, not registered with pyplot (nothing to close,
    the global backend untouched); None, with one warning naming `path`, when matplotlib is not installed."""
    if not is_matplotlib_available():
        logger.warning(f"hf_prune: {INSTALL_HINT}; {path} not written.")
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str) -> str:
    """Lay out, write `path` (creating its folder) and free the figure's artists; returns `path`."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.tight_layout()
    # "tight" also keeps labels that tight_layout leaves outside the canvas (a colorbar's label).
    figure.savefig(path, bbox_inches="tight")
    figure.clear()
    return path


def clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def finite_number(value: Any, where: str) -> float:
    """`value` as a float; ValueError naming `where` for anything but a finite int or float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}.")
    return float(value)


def mean_or_nan(values: Optional[Sequence[float]]) -> float:
    return sum(values) / len(values) if values else math.nan


def annotation_size(figure, axes, rows: int, columns: int, chars: int) -> float:
    """Font size (points) at which `chars` characters fit one cell of a rows x columns grid drawn on `axes`."""
    box = axes.get_window_extent()
    cell_height = box.height / max(rows, 1) / figure.dpi * 72
    cell_width = box.width / max(columns, 1) / figure.dpi * 72
    return clamp(min(0.5 * cell_height, cell_width / (0.65 * max(chars, 1))), 4, 9)


def signed_format(limit: float) -> Callable[[float], str]:
    """'+0.123'-style formatting with three significant digits at the scale of `limit` (the largest |value|)."""
    decimals = int(clamp(2 - math.floor(math.log10(limit)), 0, 4)) if limit > 0 else 3
    return lambda value: f"{value:+.{decimals}f}"


def draw_heatmap(figure, axes, values: Sequence[Sequence[float]], rows: Sequence[Any], columns: Sequence[Any], *,
                 cmap: str, vmin: float, vmax: float, label: str, fmt: Callable[[float], str], annotate: bool = True):
    """`values` (rows x columns; NaN = no data, shown blank with a dash) as an image with a colour bar titled `label`,
    each cell annotated with `fmt(value)` in black or white, whichever reads on its colour. Returns the image."""
    image = axes.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(len(columns)), [str(c) for c in columns])
    axes.set_yticks(range(len(rows)), [str(r) for r in rows])
    figure.colorbar(image, ax=axes, label=label)
    if not annotate:
        return image
    size = annotation_size(figure, axes, len(rows), len(columns), max(len(fmt(v)) for row in values for v in row))
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if math.isnan(value):
                axes.text(j, i, "-", ha="center", va="center", fontsize=size, color="grey")
                continue
            r, g, b, _ = image.cmap(image.norm(value))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            axes.text(j, i, fmt(value), ha="center", va="center", fontsize=size, color=color)
    return image
