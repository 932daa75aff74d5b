"""Where the heads, FFN neurons, layers and hidden channels of a model live (public: the layer view).

A family is described once, declaratively, by a `Layout` (one transformer layer: its attention blocks and its MLP,
paths relative to the layer) registered with `register_layout` (the table is `hf_prune.structure.layouts`).
`find_layers(model)` finds the model's stacks of layers (every `nn.ModuleList` whose layers all match a registered
layout: one stack for encoders and decoders, two for encoder-decoder models) and returns them as one `LayerView`.
Everything else in `hf_prune.structure` (removal, empty-structure detection, summaries, width and depth) and
`hf_prune.units` (importance, gradual masking) reads the model through this view, so a new family is one
registration, never edits across modules.

Numbering. FFN neurons are keyed by layer (position in the view: encoder layers first, then decoder layers). Heads
are keyed by attention block (`attention_sites`): the self-attention of each layer in order, a decoder layer's
cross-attention right after its self-attention. For a model with one attention block per layer (every encoder-only
and decoder-only family) the attention index is the layer index, as in Transformers' own `prune_heads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from torch import nn

from .paths import find_module, get_module
from .slicing import in_width_of, out_width_of
from .spec import AttentionLayout, HiddenLayout, Layout, MlpLayout, MoeLayout, registered_layouts
from .standins import TRANSFORMERS_MAJOR

NEURONS_ATTR = "hf_prune_pruned_neurons"


# ----------------------------------------------------------------------------------------------------------------
# The layer view
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    path: str  # path of the nn.ModuleList from the model root
    layers: nn.ModuleList
    layout: Layout


@dataclass
class LayerView(Sequence):
    """The transformer layers of a model across its stacks (encoder first), each with its layout."""

    stacks: list[Stack]
    _index: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        self._index = [(s, i) for s, stack in enumerate(self.stacks) for i in range(len(stack.layers))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> nn.Module:  # type: ignore[override]
        s, j = self._index[i]
        return self.stacks[s].layers[j]

    def __iter__(self) -> Iterator[nn.Module]:
        for s, j in self._index:
            yield self.stacks[s].layers[j]

    def layout(self, i: int) -> Layout:
        return self.stacks[self._index[i][0]].layout

    def stack_of(self, i: int) -> tuple[Stack, int]:
        """The stack of layer `i` and the layer's position in it."""
        s, j = self._index[i]
        return self.stacks[s], j

    @property
    def name(self) -> str:
        return "+".join(dict.fromkeys(stack.layout.name for stack in self.stacks))


def _find_stacks(model: nn.Module) -> list[Stack]:
    layouts = registered_layouts()
    stacks: list[Stack] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(t + ".") for t in taken):
            continue  # a list inside a layer already found (T5's sub-layers, experts)
        for layout in layouts:
            if all(layout.matches(layer) for layer in module):
                stacks.append(Stack(path, module, layout))
                taken.append(path)
                break
    return stacks


def _describe_unknown(model: nn.Module) -> str:
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return "it has no nn.ModuleList of layers"
    path, module = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    children = sorted({name.split(".")[0] + ("." + name.split(".")[1] if "." in name else "")
                       for name, _ in module[0].named_modules() if name and name.count(".") <= 1})
    return f"its largest layer list {path!r} holds {type(module[0]).__name__} layers with modules {children[:24]}"


def find_layers(model: nn.Module) -> tuple[Layout, LayerView]:
    """The layout of the model's first stack and the view of all its transformer layers.

    Raises a ValueError naming what was found, and how to register a layout, when no registered layout matches.
    """
    stacks = _find_stacks(model)
    if not stacks:
        names = ", ".join(layout.name for layout in registered_layouts())
        raise ValueError(
            f"hf_prune structured pruning found no layer layout it knows in {type(model).__name__} "
            f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}): "
            f"{_describe_unknown(model)}. Registered layouts: {names}. Describe the family with "
            "hf_prune.structure.Layout (its attention and MLP projections) and hf_prune.structure.register_layout."
        )
    for stack in stacks:
        if stack.layout.refuse:
            raise ValueError(f"hf_prune: structured pruning of {type(model).__name__} is not supported: "
                             f"{stack.layout.refuse}")
    return stacks[0].layout, LayerView(stacks)


# ----------------------------------------------------------------------------------------------------------------
# Heads, per attention block
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionSite:
    """One attention block of the model: the key of `prune_heads` is its position in `attention_sites(model)`."""

    index: int
    layer_idx: int  # position of its layer in the LayerView
    layer: nn.Module
    spec: AttentionLayout
    layout: Layout


def normalize_units(
    units: Optional[Mapping[Any, Iterable[int]]], num_layers: int, kind: str, where: str = "layer"
) -> dict[int, set[int]]:
    """{key: set of unit indices} with integer keys checked against `num_layers` (a ValueError names the key)."""
    result: dict[int, set[int]] = {}
    for layer, indices in (units or {}).items():
        layer = int(layer)
        if not 0 <= layer < num_layers:
            raise ValueError(f"hf_prune: {where} {layer} in the {kind} to prune does not exist (0 to {num_layers - 1}).")
        result.setdefault(layer, set()).update(int(i) for i in indices)
    return result


def attention_sites(model: nn.Module, view: Optional[LayerView] = None) -> list[AttentionSite]:
    if view is None:
        _, view = find_layers(model)
    sites: list[AttentionSite] = []
    for i, layer in enumerate(view):
        layout = view.layout(i)
        for spec in layout.attentions:
            if spec.present(layer):
                sites.append(AttentionSite(len(sites), i, layer, spec, layout))
    return sites


def head_dim_of(spec: AttentionLayout, layer: nn.Module) -> int:
    core = get_module(layer, spec.core)
    for attr in spec.head_dim_attrs:
        value = getattr(core, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"hf_prune: {type(core).__name__} has none of the head-size attributes {spec.head_dim_attrs}.")


def num_heads_of(spec: AttentionLayout, layer: nn.Module) -> int:
    """Query heads present."""
    return in_width_of(get_module(layer, spec.output)) // head_dim_of(spec, layer)


def num_kv_heads_of(spec: AttentionLayout, layer: nn.Module) -> int:
    """Key/value heads present (equal to the query heads without grouped-query attention)."""
    heads = num_heads_of(spec, layer)
    if heads == 0:
        return 0
    head_dim = head_dim_of(spec, layer)
    if spec.qkv:
        total = out_width_of(get_module(layer, spec.qkv)) // head_dim
        return (total - heads) // 2
    return out_width_of(get_module(layer, spec.key)) // head_dim


def group_size_of(spec: AttentionLayout, layer: nn.Module) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    heads = num_heads_of(spec, layer)
    if heads == 0:
        return int(getattr(get_module(layer, spec.core), "hf_prune_group_size", 1))
    return max(1, heads // max(1, num_kv_heads_of(spec, layer)))


def pruned_heads_of(spec: AttentionLayout, layer: nn.Module) -> set[int]:
    return set(getattr(get_module(layer, spec.owner), "pruned_heads", set()) or set())


def kept_heads_of(spec: AttentionLayout, layer: nn.Module) -> list[int]:
    """Original indices of the heads still present, in the order of their channels."""
    pruned = pruned_heads_of(spec, layer)
    total = num_heads_of(spec, layer) + len(pruned)
    return [h for h in range(total) if h not in pruned]


def qkv_rows(spec: AttentionLayout, layer: nn.Module, part: str, units: Sequence[int]) -> Any:
    """Output rows of the fused q/k/v projection holding `part` ("q", "k" or "v") of the current query heads
    (part "q") or key/value heads (parts "k", "v") at positions `units`."""
    import torch

    from .slicing import channel_index

    head_dim = head_dim_of(spec, layer)
    heads, kv = num_heads_of(spec, layer), num_kv_heads_of(spec, layer)
    if spec.packing(layer) == "blocks":
        offset = {"q": 0, "k": heads * head_dim, "v": (heads + kv) * head_dim}[part]
        return channel_index(list(units), head_dim, offset)
    group = max(1, heads // max(1, kv))
    block = (group + 2) * head_dim
    if part == "q":
        rows = [g * block + (h % group) * head_dim for h in units for g in [h // group]]
    else:
        rows = [g * block + (group + (part == "v")) * head_dim for g in units]
    if not rows:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(r, r + head_dim) for r in rows])


def qkv_group_rows(spec: AttentionLayout, layer: nn.Module, groups: Sequence[int]) -> Any:
    """Output rows of a "per_group" packed q/k/v projection holding whole key/value groups `groups` (current
    positions), in their packed order."""
    from .slicing import channel_index

    head_dim = head_dim_of(spec, layer)
    heads, kv = num_heads_of(spec, layer), num_kv_heads_of(spec, layer)
    return channel_index(list(groups), (heads // max(1, kv) + 2) * head_dim)


# ----------------------------------------------------------------------------------------------------------------
# Neurons, per layer
# ----------------------------------------------------------------------------------------------------------------


def pruned_neurons_of(mlp: MlpLayout, layer: nn.Module) -> set[int]:
    return set(getattr(get_module(layer, mlp.owner), NEURONS_ATTR, set()) or set())


def kept_neurons_of(mlp: MlpLayout, layer: nn.Module) -> list[int]:
    pruned = pruned_neurons_of(mlp, layer)
    total = in_width_of(get_module(layer, mlp.output)) + len(pruned)
    return [n for n in range(total) if n not in pruned]


def min_heads_per_block(model: nn.Module) -> int:
    """Heads every attention block must keep: one key/value group where the block hands a per-head position bias on
    to later layers (T5), else 0."""
    return max((group_size_of(s.spec, s.layer) for s in attention_sites(model) if s.spec.shared_position_bias),
               default=0)


def head_group_size(model: nn.Module) -> int:
    """Query heads that must be removed together (grouped-query attention), 1 otherwise."""
    return max((group_size_of(s.spec, s.layer) for s in attention_sites(model)), default=1)


# ----------------------------------------------------------------------------------------------------------------
# Experts and the neurons inside them (mixture-of-experts layers)
# ----------------------------------------------------------------------------------------------------------------

EXPERTS_ATTR = "hf_prune_pruned_experts"  # on the MoE block: ORIGINAL indices of the experts removed
EXPERT_SIZE_ATTR = "hf_prune_expert_size"  # on the MoE block: neurons per routed expert before any was removed


def pruned_experts_of(moe: MoeLayout, layer: nn.Module) -> set[int]:
    return set(getattr(get_module(layer, moe.block), EXPERTS_ATTR, set()) or set())


def num_experts_of(moe: MoeLayout, layer: nn.Module) -> int:
    """Experts present (rows of the router)."""
    return int(get_module(layer, moe.router).weight.shape[0])


def kept_experts_of(moe: MoeLayout, layer: nn.Module) -> list[int]:
    pruned = pruned_experts_of(moe, layer)
    return [e for e in range(num_experts_of(moe, layer) + len(pruned)) if e not in pruned]


def experts_are_fused(moe: MoeLayout, layer: nn.Module) -> bool:
    return not isinstance(get_module(layer, moe.experts), nn.ModuleList)


def expert_widths(moe: MoeLayout, layer: nn.Module) -> list[int]:
    """Neurons present in each expert present, in order."""
    experts = get_module(layer, moe.experts)
    if experts_are_fused(moe, layer):
        return [int(getattr(experts, moe.fused_down).shape[2])] * num_experts_of(moe, layer)
    return [in_width_of(get_module(expert, moe.expert_mlp.output)) for expert in experts]


def expert_size(moe: MoeLayout, layer: nn.Module) -> int:
    """Neurons per routed expert in the ORIGINAL model."""
    block = get_module(layer, moe.block)
    recorded = getattr(block, EXPERT_SIZE_ATTR, None)
    return int(recorded) if recorded is not None else max(expert_widths(moe, layer), default=0)


def shared_expert_total(moe: MoeLayout, layer: nn.Module) -> int:
    if moe.shared is None or find_module(layer, moe.shared.output) is None:
        return 0
    return len(kept_neurons_of(moe.shared, layer)) + len(pruned_neurons_of(moe.shared, layer))


def moe_neuron_total(moe: MoeLayout, layer: nn.Module) -> int:
    """FFN neurons of the layer in the ORIGINAL model (every routed expert, then the shared expert)."""
    experts = num_experts_of(moe, layer) + len(pruned_experts_of(moe, layer))
    return experts * expert_size(moe, layer) + shared_expert_total(moe, layer)


def moe_pruned_neurons(moe: MoeLayout, layer: nn.Module) -> set[int]:
    """ORIGINAL ids of the neurons removed one by one (those of removed experts are not listed)."""
    return set(getattr(get_module(layer, moe.block), NEURONS_ATTR, set()) or set())


def moe_kept_neurons(moe: MoeLayout, layer: nn.Module) -> list[int]:
    """ORIGINAL ids of the neurons present, expert by expert, then the shared expert's."""
    size = expert_size(moe, layer)
    pruned = moe_pruned_neurons(moe, layer)
    kept = [e * size + n for e in kept_experts_of(moe, layer) for n in range(size) if e * size + n not in pruned]
    offset = (num_experts_of(moe, layer) + len(pruned_experts_of(moe, layer))) * size
    kept += [offset + n for n in range(shared_expert_total(moe, layer)) if offset + n not in pruned]
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Heads removed by Transformers 4.x itself
# ----------------------------------------------------------------------------------------------------------------


def native_prune_heads_available(model: nn.Module, layout: Layout) -> bool:
    """Transformers 4.x's own `prune_heads` can do (most of) the work for this model."""
    return (
        TRANSFORMERS_MAJOR < 5
        and layout.native_capable
        and hasattr(model, "prune_heads")
        and hasattr(getattr(model, "base_model", model), "_prune_heads")
    )


# ----------------------------------------------------------------------------------------------------------------
# Layers (depth) and hidden channels (width)
# ----------------------------------------------------------------------------------------------------------------

LAYERS_ATTR = "hf_prune_pruned_layers"  # on the layer list: ORIGINAL indices of the layers removed
HIDDEN_ATTR = "hf_prune_pruned_hidden"  # on the base model: ORIGINAL indices of the hidden channels removed


def pruned_layers_of(layers: Union[nn.ModuleList, LayerView]) -> set[int]:
    """ORIGINAL indices of the layers removed: local to one `nn.ModuleList`, or across the stacks of a `LayerView`
    (a stack's layers are numbered after every layer of the stacks before it, in their original counts)."""
    if not isinstance(layers, LayerView):
        return set(getattr(layers, LAYERS_ATTR, set()) or set())
    removed, offset = set(), 0
    for stack in layers.stacks:
        local = pruned_layers_of(stack.layers)
        removed |= {offset + i for i in local}
        offset += len(stack.layers) + len(local)
    return removed


def original_layer_indices(model: nn.Module) -> list[int]:
    """The ORIGINAL index of each layer still present, in order (`[0, 1, ...]` until layers are removed).

    Layer keys of `prune_heads`, `prune_ffn_neurons` and the importance tensors are positions in the current layer
    list (what Transformers' own `prune_heads` and `config.pruned_heads` index); this maps them to the original layer
    numbers that `prune_layers` and the saved structure record use.
    """
    _, view = find_layers(model)
    pruned = pruned_layers_of(view)
    return [i for i in range(len(view) + len(pruned)) if i not in pruned]


# Config fields holding a stack's number of layers in encoder-decoder models, by the stack's role (first present wins).
STACK_LAYER_FIELDS = {"encoder": ("encoder_layers", "num_layers"), "decoder": ("decoder_layers", "num_decoder_layers")}


def stack_layer_field(config: Any, stack: Stack) -> str:
    """The config field counting the layers of `stack` ("num_hidden_layers" for a single-stack model)."""
    role = "decoder" if "decoder" in stack.path.split(".") else "encoder"
    for name in STACK_LAYER_FIELDS[role]:
        if isinstance(getattr(config, name, None), int):
            return name
    raise ValueError(f"hf_prune: the config names no layer count for the {role} stack {stack.path!r} "
                     f"(looked for {STACK_LAYER_FIELDS[role]}).")


def original_site_indices(model: nn.Module) -> list[int]:
    """The ORIGINAL index of each attention block still present (`attention_sites` order): what the structure record
    keys heads by. Equal to `original_layer_indices` for families with one attention block per layer."""
    _, view = find_layers(model)
    result, offset, position = [], 0, 0
    for stack in view.stacks:
        local = pruned_layers_of(stack.layers)
        per_layer = sum(1 for spec in stack.layout.attentions if spec.present(stack.layers[0]))
        for i in range(len(stack.layers) + len(local)):
            if i not in local:
                result += list(range(offset + i * per_layer, offset + (i + 1) * per_layer))
        offset += (len(stack.layers) + len(local)) * per_layer
        position += len(stack.layers)
    return result


def pruned_hidden_of(model: nn.Module) -> set[int]:
    return set(getattr(getattr(model, "base_model", model), HIDDEN_ATTR, set()) or set())


def hidden_size_of(layout: Layout, layers: Sequence[nn.Module]) -> int:
    """Width of the residual stream: what the first attention block's output projection writes."""
    layer = layers[0]
    for spec in layout.attentions:
        if spec.present(layer):
            return out_width_of(get_module(layer, spec.output))
    raise ValueError("hf_prune: the first layer has no attention block to read the hidden size from.")


# Task heads that read the last hidden states, relative to the whole model (the pooler relative to the base model).
# An adapter maps the hidden states into a space of its own (pooled, pre-classifier): its inputs are the residual
# stream, its outputs are not, so what reads them ("classifier" after an adapter) keeps its shape.
BASE_ADAPTERS = ("pooler.dense",)
HEAD_ADAPTERS = ("classifier.dense", "pre_classifier", "pooler.dense", "head.dense")  # DeBERTa, ModernBERT
HEAD_READERS = ("qa_outputs", "score", "lm_head", "embed_out", "proj_out")  # proj_out: Whisper
# Read an adapter's output when there is one (ModernBERT normalises it first).
ADAPTED_READERS = ("classifier", "classifier.out_proj", "head.norm")


def hidden_layout(model: nn.Module, layout: Layout) -> HiddenLayout:
    """The `HiddenLayout` of `model`'s family, or a ValueError saying why width pruning does not apply."""
    spec = layout.hidden
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    reason = ""
    if spec is None or spec.refuse:
        reason = spec.refuse if spec is not None else "its embeddings and norms are not described in its layout"
    else:
        for fields, why in spec.refuse_when:
            present = [f for f in fields if hasattr(config, f)]
            if present and getattr(config, present[0]):
                reason = why
                break
    if reason:
        raise ValueError(
            f"hf_prune: width pruning (hidden channels) is not available for {type(model).__name__} "
            f"(model_type={model_type!r}, layout {layout.name!r}): {reason}."
        )
    return spec
