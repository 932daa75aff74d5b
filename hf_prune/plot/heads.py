"""Which attention heads matter, and which were removed."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from .canvas import clamp, draw_heatmap, new_figure, save_figure


def removed_cells(removed: Optional[Mapping[Any, Sequence[int]]], shape: tuple[int, int]) -> list[tuple[int, int]]:
    """(layer, head) pairs of `removed` ({layer: [heads]}, int or str keys as from JSON), checked against `shape`."""
    cells = []
    for layer, heads in (removed or {}).items():
        for head in heads:
            if not (0 <= int(layer) < shape[0] and 0 <= int(head) < shape[1]):
                raise ValueError(f"removed: head {head} of layer {layer} lies outside the importance tensor "
                                 f"[{shape[0]} layers, {shape[1]} heads].")
            cells.append((int(layer), int(head)))
    return cells


def plot_head_importance(importance: torch.Tensor, path: str,
                         removed: Optional[Mapping[int, Sequence[int]]] = None) -> Optional[str]:
    """Heatmap of head importance (rows: layers, columns: heads in the original numbering; brighter = more
    important), the heads in `removed` ({layer: [heads]}) hatched in red. A good selection hatches dark cells;
    a layer that is dark all over is one the model barely uses."""
    scores = torch.as_tensor(importance).detach().float().cpu()
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"importance must be a non-empty [layers, heads] tensor, got shape {tuple(scores.shape)}.")
    if not torch.isfinite(scores).all():
        raise ValueError("importance holds NaN or infinite values.")
    layers, heads = scores.shape
    cells = removed_cells(removed, (layers, heads))
    figure = new_figure(clamp(2.5 + 0.55 * heads, 6, 16), clamp(1.8 + 0.4 * layers, 3, 20), path)
    if figure is None:
        return None
    from matplotlib.patches import Rectangle

    axes = figure.add_subplot()
    low, high = float(scores.min()), float(scores.max())
    draw_heatmap(figure, axes, scores.tolist(), range(layers), range(heads), cmap="viridis", vmin=low,
                 vmax=high if high > low else low + 1e-9, label="importance", fmt=lambda v: f"{v:.2f}",
                 annotate=scores.numel() <= 256)
    for layer, head in cells:
        axes.add_patch(Rectangle((head - 0.45, layer - 0.45), 0.9, 0.9, fill=False, hatch="//", edgecolor="red",
                                 linewidth=2.0))
    axes.set_xlabel("head (original numbering)")
    axes.set_ylabel("layer")
    removed_text = f"\nhatched red: the {len(cells)} removed" if cells else ""
    axes.set_title(f"Attention head importance (higher = keep){removed_text}", fontsize=10)
    return save_figure(figure, path)
