"""Sensitivity analysis: how much a metric suffers when one part of the model is pruned, part by part and level by level.

Layers do not tolerate pruning equally: the first and last blocks, the value and output projections, some heads
matter more than others (Han et al. 2015, "Learning both Weights and Connections", section 4; Michel et al. 2019,
"Are Sixteen Heads Really Better than One?"). `analyze_sensitivity` measures it directly. For each group

    linear     one targeted Linear (or Conv1D)
    attention  a block's attention projections (q/k/v/o, or GPT-2's fused c_attn and c_proj)
    mlp        a block's MLP projections
    heads      a block's attention heads, lowest importance first (structured: the heads' output columns)
    neurons    a block's FFN neurons, lowest importance first (structured)
    layer      every targeted Linear of a block

and each level, it prunes that group alone one-shot (weights by a registered criterion, `hf_prune.methods`; heads and
neurons by a registered unit criterion, `hf_prune.units`), measures the metric on the same calibration batches and
puts the weights back bit for bit. The result feeds `hf_prune.allocate_sparsity` (per-module sparsity for
`PruningConfig.sparsity_overrides`), `hf_prune.allocate_units` (per-layer head/neuron budgets) and
`hf_prune.plot.plot_sensitivity`.

`hf-prune sensitivity` (`hf_prune.commands.sensitivity`) runs it on a fine-tuned classifier and writes
sensitivity.json/.csv/.png and allocation.json.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .blocks import module_layers
from .config import DEFAULT_EXCLUDE, DEFAULT_TARGETS, PruningConfig
from .files import atomic_write_text
from .linear import matrix_view
from .masks import find_target_modules, select_lowest
from .methods import available_methods, get_method
from .metrics import classification_metrics
from .structure import find_layers, head_group_size, head_slots, neuron_slots
from .structure.layout import find_module, get_module
from .units import available_unit_criteria, compute_head_importance, compute_neuron_importance
from .units import select_heads_to_prune, select_neurons_to_prune
from .units.base import loss_gradients, model_loss, move_batch

logger = logging.get_logger(__name__)

GroupKind = Literal["linear", "attention", "mlp", "heads", "neurons", "layer"]
GROUP_KINDS: tuple[str, ...] = ("linear", "attention", "mlp", "heads", "neurons", "layer")
STRUCTURED_KINDS = ("attention", "mlp", "heads", "neurons")  # need a known architecture layout
DEFAULT_LEVELS: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
METRICS = ("loss", "accuracy")
FORMAT_VERSION = 1
# The transformer block a module lives in, by name, when the architecture has no known layout.

Metric = Union[None, str, Callable[[nn.Module, Sequence[Mapping[str, Any]]], float]]


# ------------------------------------------------------------------------------------------------ result
@dataclass
class SensitivityResult:
    """What `analyze_sensitivity` measured.

    Attributes:
        rows: one dict per (group, level): {"group", "kind", "layer" (int or None), "level", "metric", "delta"
            (metric - baseline), "params" (weights of the group)}.
        baseline: the metric of the unpruned model on the same batches.
        metric: its name ("loss", "accuracy" or the callable's name); `higher_is_better` its direction.
        method: the weight criterion; `unit_importance` the head/neuron criterion.
        levels: the pruning levels (fractions of each group's weights, or of a layer's heads/neurons).
        groups: {group: {"kind", "layer", "modules": {module name: weights}, "params", and for heads/neurons
            "units" and "group_size"}}: what `allocate_sparsity` / `allocate_units` need.
        info: free-form context (data, split, batches).
    """

    rows: list[dict[str, Any]]
    baseline: float
    metric: str = "loss"
    higher_is_better: bool = False
    method: str = "magnitude"
    unit_importance: str = "gradient"
    levels: list[float] = field(default_factory=lambda: list(DEFAULT_LEVELS))
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SensitivityResult":
        """Rebuild from `to_dict()`; keys a newer hf_prune added are ignored with a warning."""
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("hf_prune: ignoring unknown sensitivity keys %s (format_version %s; this hf_prune reads "
                           "%s).", unknown, version, FORMAT_VERSION)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str) -> str:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str) -> "SensitivityResult":
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def to_csv(self, path: str) -> str:
        buffer = io.StringIO()
        columns = ["group", "kind", "layer", "level", "metric", "delta", "params"]
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
        return atomic_write_text(path, buffer.getvalue())

    def damage(self, row: Mapping[str, Any]) -> float:
        """How much worse the metric got in `row` (positive = worse), whatever its direction."""
        return -row["delta"] if self.higher_is_better else row["delta"]

    def most_sensitive(self, level: Optional[float] = None, count: int = 5) -> list[dict[str, Any]]:
        """The `count` rows that hurt most, at `level` (default: the highest measured level)."""
        level = max(self.levels) if level is None else level
        rows = [r for r in self.rows if abs(r["level"] - level) < 1e-12]
        return sorted(rows, key=self.damage, reverse=True)[:count]


# ------------------------------------------------------------------------------------------------ groups
def sensitivity_groups(
    model: nn.Module,
    kinds: Optional[Sequence[str]] = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, dict[str, Any]]:
    """The groups `analyze_sensitivity` prunes, in model order, layer by layer.

    Names: a Linear is named by its module name; the other kinds by their block's path and kind
    (`bert.encoder.layer.0:attention`), a whole block by its path. `kinds=None` takes every kind the architecture
    supports (attention, mlp, heads and neurons need a layout `hf_prune.structure` knows).
    """
    try:
        layout, layers = find_layers(model)
    except ValueError:
        layout, layers = None, None
    explicit = kinds is not None
    kinds = list(GROUP_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in GROUP_KINDS]
    if unknown or not kinds:
        raise ValueError(f"analyze_sensitivity: groups={kinds!r} is invalid: choose among {list(GROUP_KINDS)}.")
    if layout is None:
        structured = [k for k in kinds if k in STRUCTURED_KINDS]
        if structured and explicit:
            raise ValueError(f"analyze_sensitivity: groups={structured} needs an architecture hf_prune.structure knows "
                             f"(hf_prune.structure.registered_layouts()); {type(model).__name__} is not one. Use "
                             "groups=['linear', 'layer'].")
        kinds = [k for k in kinds if k not in STRUCTURED_KINDS]
    modules = find_target_modules(model, tuple(targets), tuple(exclude))
    if not modules:
        raise ValueError(f"analyze_sensitivity: targets={list(targets)} (exclude={list(exclude)}) matches no "
                         f"nn.Linear/Conv1D module of {type(model).__name__}.")
    numel = {name: module.weight.numel() for name, module in modules.items()}
    layer_of = module_layers(model, modules)
    blocks: dict[str, int] = {}
    for found in layer_of.values():
        if found is not None:
            blocks.setdefault(found[0], found[1])

    def weight_group(kind: str, layer: Optional[int], members: list[str]) -> dict[str, Any]:
        return {"kind": kind, "layer": layer, "modules": {n: numel[n] for n in members},
                "params": sum(numel[n] for n in members)}

    groups: dict[str, dict[str, Any]] = {}
    if "heads" in kinds and layers is not None and len(head_slots(model)) != len(layers):
        # Encoder-decoder layers hold two attention blocks (self and cross): heads are keyed by block, not layer.
        if explicit:
            raise ValueError(f"analyze_sensitivity: groups=['heads'] measures one attention block per layer; "
                             f"{type(model).__name__} has decoder layers with self- and cross-attention. Use "
                             "groups=['attention', 'neurons', 'mlp', 'layer', 'linear'].")
        kinds = [k for k in kinds if k != "heads"]
    slots = {"heads": head_slots(model) if "heads" in kinds else [],
             "neurons": neuron_slots(model) if "neurons" in kinds else []}
    group_size = head_group_size(model) if slots["heads"] else 1
    for path, index in blocks.items():
        members = [n for n in modules if layer_of[n] == (path, index)]
        if "linear" in kinds:
            for name in members:
                groups[name] = weight_group("linear", index, [name])
        layer_module = get_module(model, path) if layout is not None else None
        for kind in ("attention", "mlp"):
            if kind not in kinds or layer_module is None:
                continue
            block_layout = layers.layout(index)
            own = block_layout.attention_paths() if kind == "attention" else block_layout.mlp_paths()
            wanted = {f"{path}.{p}" for p in own if p}
            part = [n for n in members if n in wanted]
            if part:
                groups[f"{path}:{kind}"] = weight_group(kind, index, part)
        for kind in ("heads", "neurons"):
            slot = next((s for s in slots[kind] if layers is not None and s.layer_idx == index
                         and layers[index] is get_module(model, path)), None)
            if slot is None or all(piece.module is None for piece in slot.pieces()):
                continue
            block_layout = layers.layout(index)
            own = block_layout.attention_paths() if kind == "heads" else block_layout.mlp_paths()
            params = sum(m.weight.numel() for p in own if (m := find_module(layers[index], p)) is not None
                         and getattr(m, "weight", None) is not None)
            moe = block_layout.moe
            if kind == "neurons" and moe is not None:  # the experts' matrices, shared expert included; not the router
                block, router = get_module(layers[index], moe.block), get_module(layers[index], moe.router)
                params = sum(p.numel() for p in block.parameters()) - router.weight.numel()
            groups[f"{path}:{kind}"] = {"kind": kind, "layer": index, "modules": {}, "params": params,
                                        "units": slot.total, "group_size": group_size if kind == "heads" else 1}
        if "layer" in kinds and members:
            groups[path] = weight_group("layer", index, members)
    if "linear" in kinds:
        for name in modules:
            if layer_of[name] is None:
                groups[name] = weight_group("linear", None, [name])
    return groups


# ------------------------------------------------------------------------------------------------ metrics
def loss_metric(model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> float:
    """Mean loss per example over `batches` (the model's own loss; language models predict their input ids)."""
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            size = _batch_size(batch)
            total += float(model_loss(model, dict(batch))) * size
            count += size
    return total / count


loss_metric.higher_is_better = False  # type: ignore[attr-defined]


def accuracy_metric(model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> float:
    """Accuracy of the argmax of the logits against `labels` (positions labelled -100 left out)."""
    predictions, labels = [], []
    with torch.no_grad():
        for batch in batches:
            if "labels" not in batch:
                raise ValueError("analyze_sensitivity: metric='accuracy' needs batches with `labels`; use "
                                 "metric='loss' or a callable.")
            outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
            logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
            predictions.append(logits.argmax(dim=-1).reshape(-1).cpu())
            labels.append(batch["labels"].reshape(-1).cpu())
    predicted, truth = torch.cat(predictions), torch.cat(labels)
    keep = truth != -100
    return classification_metrics(predicted[keep].numpy(), truth[keep].numpy())["accuracy"]


accuracy_metric.higher_is_better = True  # type: ignore[attr-defined]


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _resolve_metric(metric: Metric, higher_is_better: Optional[bool]) -> tuple[Callable, str, bool]:
    if metric is None or metric == "loss":
        function, name = loss_metric, "loss"
    elif metric == "accuracy":
        function, name = accuracy_metric, "accuracy"
    elif callable(metric):
        function, name = metric, getattr(metric, "__name__", type(metric).__name__)
    else:
        raise ValueError(f"analyze_sensitivity: metric={metric!r} is invalid: give None (loss), one of {METRICS}, or "
                         "a callable(model, batches) -> float.")
    if higher_is_better is None:
        higher_is_better = bool(getattr(function, "higher_is_better", False))
    return function, name, higher_is_better


# ------------------------------------------------------------------------------------------------ scores
def weight_scores(
    model: nn.Module, modules: Mapping[str, nn.Module], method: str, batches: Sequence[Mapping[str, Any]]
) -> dict[str, torch.Tensor]:
    """Scores of every weight of `modules` (stored layout, higher = keep) by the registered criterion `method`.

    Criteria that read gradients (`needs_gradients`, e.g. movement: -W * dL/dW, Sanh et al. 2020) get the
    gradients of the loss on `batches`, one batch at a time, through `torch.autograd.grad`, so no `.grad` is
    created or changed. Criteria that learn their scores in training (soft movement) are refused.
    """
    if method not in available_methods():
        raise ValueError(f"analyze_sensitivity: method={method!r} is not a registered pruning method; choose one of "
                         f"{list(available_methods())}.")
    cls = get_method(method)
    if cls.requires_trainer:
        raise ValueError(f"analyze_sensitivity: method={method!r} learns its scores during training with "
                         "PruningTrainer, so it has nothing to rank a trained model by in one shot; use a criterion "
                         "that scores one-shot, e.g. 'magnitude' or 'movement' (gradients over the calibration "
                         "batches).")
    criterion = cls(PruningConfig(method=method))
    criterion.attach(dict(modules))
    if cls.needs_gradients:
        names = list(modules)
        weights = [modules[n].weight for n in names]
        for batch in batches:
            grads = loss_gradients(model, batch, weights)
            used = [(n, w.detach(), g) for n, w, g in zip(names, weights, grads) if g is not None]
            if used:
                criterion.on_gradients([u[0] for u in used], [u[1] for u in used], [u[2] for u in used])
    return {name: criterion.scores(name, module).detach().float().clone() for name, module in modules.items()}


# ------------------------------------------------------------------------------------------------ analysis
def check_levels(levels: Sequence[float], option: str = "analyze_sensitivity: levels=") -> list[float]:
    values = list(levels) if levels is not None else []
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0
                         for v in values):
        raise ValueError(f"{option}{levels!r} is invalid: give pruning levels in (0, 1], e.g. "
                         f"{list(DEFAULT_LEVELS)}.")
    return sorted({float(v) for v in values})


def _zero_units(model: nn.Module, kind: str, layer: int, units: Iterable[int]) -> None:
    """Zero the input columns of the output (heads) or down (neurons) projection that carry `units` of `layer`:
    exactly what removing them does to the block's output."""
    slot = (head_slots(model) if kind == "heads" else neuron_slots(model))[layer]
    for piece in slot.pieces():  # a mixture-of-experts layer holds its neurons in one matrix per expert
        if piece.module is None:
            continue
        matrix = matrix_view(piece.module, piece.matrix_of(piece.leaf))
        for unit in units:
            if unit in piece.kept:
                start = piece.kept.index(unit) * piece.unit_width
                matrix[:, start : start + piece.unit_width] = 0


def analyze_sensitivity(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    metric: Metric = None,
    groups: Optional[Sequence[str]] = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    method: str = "magnitude",
    max_batches: Optional[int] = None,
    progress: bool = True,
    *,
    higher_is_better: Optional[bool] = None,
    unit_importance: str = "gradient",
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> SensitivityResult:
    """Prune one group at a time at each level, measure the metric, put the weights back.

    Args:
        model: a Transformers model (any with Linear/Conv1D layers for the "linear" and "layer" kinds).
        dataloader: Trainer-style batches (dicts with `input_ids`, `attention_mask`, `labels`). The first
            `max_batches` are taken once and reused for every measurement, so a shuffling loader cannot add noise.
        metric: None or "loss" (mean loss, lower is better), "accuracy" (classifiers), or a callable(model,
            batches) -> float; a callable may carry `higher_is_better = True` (or pass `higher_is_better`).
        groups: kinds of groups to prune, among GROUP_KINDS (default: every kind the architecture supports).
        levels: fractions in (0, 1] of a group's weights (or of a layer's heads/neurons) to prune.
        method: a registered weight criterion (`hf_prune.methods`): "magnitude" needs no data; "movement" ranks by
            -W * dL/dW summed over the calibration batches.
        max_batches: use only the first N batches (speed).
        progress: a tqdm bar over the measurements.
        higher_is_better: the metric's direction (default: from the metric).
        unit_importance: the head/neuron criterion (`hf_prune.units`), e.g. "gradient" or "activation".
        targets / exclude: module-name regexes of the Linears considered (PruningConfig's defaults).

    Returns:
        A `SensitivityResult`; the model's weights, buffers, `requires_grad`, `.grad` and train/eval mode are
        exactly as they were (weights restored bit for bit after every measurement, even on error).
    """
    levels = check_levels(levels)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"analyze_sensitivity: max_batches={max_batches!r} is invalid: a positive number of "
                         "batches, or None for all.")
    if unit_importance not in available_unit_criteria():
        raise ValueError(f"analyze_sensitivity: unit_importance={unit_importance!r} is not a registered unit "
                         f"criterion; choose one of {list(available_unit_criteria())}.")
    evaluate, metric_name, higher_is_better = _resolve_metric(metric, higher_is_better)
    table = sensitivity_groups(model, groups, targets, exclude)
    device = next(model.parameters()).device
    source = dataloader if max_batches is None else itertools.islice(dataloader, max_batches)
    batches = [move_batch(batch, device) for batch in source]
    if not batches:
        raise ValueError("analyze_sensitivity: the dataloader yielded no batches; the metric needs at least one.")
    modules = find_target_modules(model, tuple(targets), tuple(exclude))

    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        kinds = {info["kind"] for info in table.values()}
        scores = (weight_scores(model, modules, method, batches)
                  if kinds & {"linear", "attention", "mlp", "layer"} else {})
        importance: dict[str, Any] = {}
        if "heads" in kinds:
            importance["heads"] = compute_head_importance(model, batches, method=unit_importance, progress=False)
        if "neurons" in kinds:
            importance["neurons"] = compute_neuron_importance(model, batches, method=unit_importance, progress=False)
        baseline = float(evaluate(model, batches))
        rows = []
        bar = tqdm(total=len(table) * len(levels), desc="sensitivity", disable=not progress)
        for name, info in table.items():
            for level in levels:
                value = _measure(model, name, info, level, modules, scores, importance, evaluate, batches)
                rows.append({"group": name, "kind": info["kind"], "layer": info["layer"], "level": level,
                             "metric": value, "delta": value - baseline, "params": info["params"]})
                bar.update(1)
        bar.close()
    finally:
        for m, flag in training.items():
            m.training = flag
    return SensitivityResult(rows=rows, baseline=baseline, metric=metric_name, higher_is_better=higher_is_better,
                             method=method, unit_importance=unit_importance, levels=levels, groups=table,
                             info={"batches": len(batches), "examples": sum(_batch_size(b) for b in batches)})


def _measure(
    model: nn.Module,
    name: str,
    info: Mapping[str, Any],
    level: float,
    modules: Mapping[str, nn.Module],
    scores: Mapping[str, torch.Tensor],
    importance: Mapping[str, Any],
    evaluate: Callable,
    batches: Sequence[Mapping[str, Any]],
) -> float:
    """The metric with group `name` pruned at `level`; every touched weight is copied back afterwards."""
    kind = info["kind"]
    if kind in ("heads", "neurons"):
        layer = int(info["layer"])
        slot = (head_slots(model) if kind == "heads" else neuron_slots(model))[layer]
        touched = list({id(p.leaf): p.leaf for p in slot.pieces() if p.module is not None}.values())
    else:
        touched = [modules[m].weight for m in info["modules"]]
    saved = [w.detach().clone() for w in touched]
    try:
        with torch.no_grad():
            if kind == "heads":
                size = int(info["group_size"])
                count = int(round(level * info["units"] / size)) * size
                chosen = select_heads_to_prune(importance["heads"], layer_budget={layer: count}, model=model,
                                               group_size=size, allow_remove_all=True)
                _zero_units(model, kind, layer, chosen.get(layer, []))
            elif kind == "neurons":
                count = int(round(level * info["units"]))
                chosen = select_neurons_to_prune(importance["neurons"], layer_budget={layer: count}, model=model,
                                                 allow_remove_all=True)
                _zero_units(model, kind, layer, chosen.get(layer, []))
            else:
                for module_name in info["modules"]:
                    weight = modules[module_name].weight
                    pruned = select_lowest([scores[module_name]], level)[0]
                    weight.masked_fill_(pruned.view(weight.shape), 0)
        return float(evaluate(model, batches))
    finally:
        with torch.no_grad():
            for weight, copy in zip(touched, saved):
                weight.copy_(copy)
