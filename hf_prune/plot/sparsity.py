"""Where the zeros are: sparsity per layer and module type, as bars and as a heatmap."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Union

from torch import nn

from ..config import BLOCK_NAMES
from ..masks import sparsity_report
from ..structure.spec import registered_layouts
from .canvas import clamp, draw_heatmap, new_figure, save_figure

# The transformer block a module lives in, and its path inside the block (the naming `DEFAULT_TARGETS` matches).
LAYER_PATTERN = re.compile(rf"(?:^|\.){BLOCK_NAMES}\.(?P<index>\d+)\.(?P<rest>.+)$")
MODULE_TYPES = ("query", "key", "value", "qkv", "attention output", "FFN in", "FFN out")

ReportOrModel = Union[Mapping[str, Any], nn.Module]


def report_of(report_or_model: ReportOrModel) -> Mapping[str, Any]:
    """A `sparsity_report` dict as given, or measured on a model (default targets); ValueError if it has no modules."""
    if isinstance(report_or_model, nn.Module):
        return sparsity_report(report_or_model)
    if not isinstance(report_or_model, Mapping) or not report_or_model.get("modules"):
        raise ValueError("report must be a sparsity_report(model) dict with a non-empty 'modules' entry, or a model; "
                         f"got {type(report_or_model).__name__} without modules.")
    return report_or_model


def module_types() -> dict[str, str]:
    """Path inside a transformer layer -> module type, for every registered layout."""
    table = {}
    for layout in registered_layouts():
        for attention in layout.attentions:
            pairs = [(attention.query, "query"), (attention.key, "key"), (attention.value, "value"),
                     (attention.qkv, "qkv"), (attention.output, "attention output")]
            table.update({path: kind for path, kind in pairs if path and path not in table})
        if layout.mlp is not None:
            pairs = [(path, "FFN in") for path in (*layout.mlp.inputs, layout.mlp.fused)] + [(layout.mlp.output, "FFN out")]
            table.update({path: kind for path, kind in pairs if path and path not in table})
    return table


def layer_counts(report: Mapping[str, Any]) -> dict[int, dict[str, list[int]]]:
    """{layer: {module type: [zeros, params]}} of the report's modules inside a numbered layer, layers ascending."""
    table = module_types()
    counts: dict[int, dict[str, list[int]]] = {}
    for name, entry in report["modules"].items():
        match = LAYER_PATTERN.search(name)
        if match is None or not entry.get("params"):
            continue
        kind = table.get(match.group("rest"), match.group("rest"))
        cell = counts.setdefault(int(match.group("index")), {}).setdefault(kind, [0, 0])
        cell[0] += int(entry["zeros"])
        cell[1] += int(entry["params"])
    if not counts:
        raise ValueError(f"report: no module sits in a numbered layer (names like 'encoder.layer.3.', 'layers.3.', "
                         f"'h.3.'); its modules are, for example: {list(report['modules'])[:4]}.")
    return dict(sorted(counts.items()))


def ordered_types(counts: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The module types present, known ones in `MODULE_TYPES` order, others after them as first seen."""
    seen = list(dict.fromkeys(kind for layer in counts.values() for kind in layer))
    return [k for k in MODULE_TYPES if k in seen] + [k for k in seen if k not in MODULE_TYPES]


def sparsity_by_layer(report_or_model: ReportOrModel) -> dict[int, dict[str, float]]:
    """{layer index: {module type: sparsity}} (fractions of zero weights; several modules of one type, such as
    Llama's gate and up projections, are pooled), from a `sparsity_report` dict or a model."""
    counts = layer_counts(report_of(report_or_model))
    return {layer: {kind: zeros / params for kind, (zeros, params) in kinds.items()} for layer, kinds in counts.items()}


def plot_layer_sparsity(report_or_model: ReportOrModel, path: str) -> Optional[str]:
    """Per-layer bars of sparsity, one bar per module type, each layer's total as a black tick and the total of all
    layers as a dashed line: where in depth, and in which projections, the zeros went."""
    counts = layer_counts(report_of(report_or_model))
    kinds = ordered_types(counts)
    layers = list(counts)
    figure = new_figure(clamp(2.5 + 0.16 * len(layers) * (len(kinds) + 1), 7, 18), 4.5, path)
    if figure is None:
        return None
    from matplotlib import colormaps

    axes = figure.add_subplot()
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        present = [(i, counts[layer][kind]) for i, layer in enumerate(layers) if kind in counts[layer]]
        axes.bar([i + (j - (len(kinds) - 1) / 2) * width for i, _ in present],
                 [100 * zeros / params for _, (zeros, params) in present], width, label=kind,
                 color=colormaps["tab10"](j % 10))
    totals = [[sum(cell[k] for cell in counts[layer].values()) for k in (0, 1)] for layer in layers]
    axes.hlines([100 * z / p for z, p in totals], [i - 0.45 for i in range(len(layers))],
                [i + 0.45 for i in range(len(layers))], color="black", linewidth=1.5, label="layer, all types")
    overall = sum(z for z, _ in totals) / sum(p for _, p in totals)
    axes.axhline(100 * overall, color="grey", linestyle="--", linewidth=1, label=f"all layers ({overall:.1%})")
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlim(-0.6, len(layers) - 0.4)
    axes.set_ylim(0, 105)
    axes.set_xlabel("layer")
    axes.set_ylabel("sparsity (% of weights at zero)")
    axes.set_title("Sparsity per layer and module type")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(True, axis="y", alpha=0.3)
    return save_figure(figure, path)


def plot_sparsity_heatmap(report_or_model: ReportOrModel, path: str) -> Optional[str]:
    """Layers (rows) x module types (columns), coloured and annotated by sparsity, '-' where a layer has no module of
    that type. The numbers of `plot_layer_sparsity`, legible for deep models too."""
    counts = layer_counts(report_of(report_or_model))
    kinds = ordered_types(counts)
    values = [[100 * cells[kind][0] / cells[kind][1] if kind in cells else math.nan for kind in kinds]
              for cells in counts.values()]
    figure = new_figure(clamp(2.5 + 1.1 * len(kinds), 6, 16), clamp(1.5 + 0.32 * len(counts), 3, 20), path)
    if figure is None:
        return None
    axes = figure.add_subplot()
    draw_heatmap(figure, axes, values, list(counts), kinds, cmap="viridis", vmin=0, vmax=100, label="sparsity (%)",
                 fmt=lambda v: f"{v:.0f}%")
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title("Sparsity by layer and module type")
    return save_figure(figure, path)
