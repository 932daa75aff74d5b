"""How a family is described: one transformer layer's attention blocks, feed-forward or mixture-of-experts block and
residual stream, as paths relative to the layer (`Layout`), and the registry the layer view reads
(`register_layout`). The built-in descriptions are in `layouts.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from .paths import find_module, get_module
from .standins import EmptyAttention, NoHeadsSelfAttention

# ----------------------------------------------------------------------------------------------------------------
# The description of one family
# ----------------------------------------------------------------------------------------------------------------

# Packing of a fused q/k/v projection's output rows:
#   "blocks":    [all query heads | all key heads | all value heads]            GPT-2, Phi-3, ModernBERT, Falcon MQA
#   "per_group": per key/value group: [its query heads, its key, its value]     GPT-NeoX (groups of 1), Falcon
Packing = Union[str, Callable[[nn.Module], str]]


@dataclass(frozen=True)
class AttentionLayout:
    """One attention block of a layer: paths relative to the layer, attribute names on the computing module.

    Heads are found from the shapes (query heads = output-projection inputs / head_dim; key/value heads from the key
    projection or the fused projection's width), so grouped-query and multi-query attention need no flag.
    """

    owner: str  # module that carries `pruned_heads` (original numbering, local to this block)
    core: str  # module computing the heads; replaced by a stand-in when no head is left
    output: str  # attention output projection; its inputs are the concatenated heads
    query: str = ""
    key: str = ""
    value: str = ""
    qkv: str = ""  # a fused q/k/v projection instead of the three above
    qkv_packing: Packing = "blocks"
    # Fields of the block's own `config` that its forward reads as head counts (Phi-3 reads
    # `config.num_attention_heads`): the block gets a private copy of the config with its own counts.
    config_counts: tuple[tuple[str, str], ...] = ()  # (config field, "heads" or "kv")
    # Arguments of the core's forward holding a per-head tensor computed for all ORIGINAL heads outside the block
    # (MPNet's shared relative position bias, axis 1): a forward pre-hook selects the heads the block still has.
    head_inputs: tuple[str, ...] = ()
    extra_heads: tuple[str, ...] = ()  # more projections whose outputs are query-head channels, where present
    head_dim_attrs: tuple[str, ...] = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
    count_attrs: tuple[str, ...] = ("num_heads", "num_attention_heads", "n_heads")  # set where present
    width_attrs: tuple[str, ...] = ("all_head_size", "inner_dim")  # heads * head_dim, set where present
    kv_count_attrs: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads")  # set where present
    optional: bool = False  # absent from some layers (a cross-attention that only decoder layers have)
    # A per-head bias handed from layer to layer for every ORIGINAL head (T5's relative position bias): see
    # `hf_prune.structure.head_inputs`. Such a block keeps at least one head.
    shared_position_bias: bool = False
    outputs: int = 2  # values the core's forward returns (output, weights[, cache]); a stand-in returns as many
    cross: bool = False  # attends to another stack's states: its key/value cache is not this block's to extend

    def projections(self) -> tuple[str, ...]:
        """Every projection of the block, input side first, that exists in the layout."""
        return tuple(p for p in (self.query, self.key, self.value, self.qkv, *self.extra_heads, self.output) if p)

    def present(self, layer: nn.Module) -> bool:
        return find_module(layer, self.owner) is not None and find_module(layer, self.output) is not None

    def matches(self, layer: nn.Module) -> bool:
        if not self.present(layer):
            return self.optional and find_module(layer, self.owner) is None
        core = find_module(layer, self.core)
        if isinstance(core, (EmptyAttention, NoHeadsSelfAttention)):
            return True  # every head already removed
        inputs = (self.qkv,) if self.qkv else (self.query, self.key, self.value)
        return all(find_module(layer, p) is not None for p in inputs)

    def packing(self, layer: nn.Module) -> str:
        packing = self.qkv_packing
        return packing(get_module(layer, self.core)) if callable(packing) else packing


@dataclass(frozen=True)
class MlpLayout:
    """The feed-forward block of a layer. A neuron is one output of the input projection(s) and one input of the
    output projection; gated MLPs (SwiGLU, GeGLU) have two input projections, or one fused projection holding the
    activated half first and the linear half second (Phi-3 `gate_up_proj`, ModernBERT `Wi`)."""

    owner: str  # module that carries `hf_prune_pruned_neurons`
    output: str
    inputs: tuple[str, ...] = ()  # separate input projections, the activated one first when gated
    fused: str = ""  # one projection [activated half | linear half]
    activation: str = ""
    gated: bool = False

    def projections(self) -> tuple[str, ...]:
        return tuple(p for p in (*self.inputs, self.fused, self.output) if p)

    def matches(self, layer: nn.Module) -> bool:
        return all(find_module(layer, p) is not None for p in self.projections())


@dataclass(frozen=True)
class MoeLayout:
    """A sparse mixture-of-experts feed-forward block: a router and routed experts, optionally a shared expert.

    Experts come as an `nn.ModuleList` of MLPs (Transformers 4.x) or as one module holding the experts' weights as 3D
    tensors (Transformers 5.x). FFN neurons of a MoE layer are numbered expert by expert in the ORIGINAL numbering
    (routed expert e, neuron n is `e * original_expert_size + n`), the shared expert's neurons after all routed ones.
    """

    block: str  # the MoE block, which carries the removed experts and neurons
    router: str  # weight (experts, hidden): one row per expert
    experts: str
    expert_mlp: Optional[MlpLayout] = None  # paths inside one expert, when experts are a ModuleList
    fused_gate_up: str = "gate_up_proj"  # 3D parameters of a fused experts module: (experts, 2 * size, hidden)
    fused_down: str = "down_proj"  # (experts, hidden, size)
    shared: Optional[MlpLayout] = None  # a shared expert every token goes through, paths relative to the layer
    count_attrs: tuple[str, ...] = ("num_experts",)  # on the block, the router and the experts, where present
    size_attrs: tuple[str, ...] = ("intermediate_dim", "ffn_dim")  # per-expert width on a fused experts module
    shared_gate: str = ""  # a Linear(hidden, 1) scaling the shared expert's output per token (Qwen2-MoE)
    # Attributes holding the hidden size on the block, the router, the experts module and each expert, where int.
    hidden_attrs: tuple[str, ...] = ("hidden_dim", "hidden_size")


@dataclass(frozen=True)
class HiddenLayout:
    """Where the residual stream (hidden size) is read and written outside the attention and MLP projections.

    Paths are relative to the base model (`model.base_model`); `layer_*` paths are relative to one layer.
    """

    embeddings: tuple[str, ...]  # nn.Embedding tables whose rows are hidden vectors, where present
    # Modules that do not touch the hidden size although a dimension may equal it (per-head position tables).
    untouched: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()  # projections or convolutions outside the layers writing hidden channels, where present
    readers: tuple[str, ...] = ()  # convolutions outside the layers reading hidden channels (Whisper's second conv)
    parameters: tuple[str, ...] = ()  # bare parameters whose last dimension is the hidden size (ViT's cls token)
    norms: tuple[str, ...] = ()  # LayerNorm / RMSNorm over the hidden size outside the layers
    layer_norms: tuple[str, ...] = ()
    layer_untouched: tuple[str, ...] = ()
    size_attrs: tuple[str, ...] = ()  # "path.attribute" holding the hidden size, kept in step (bookkeeping only)
    layer_size_attrs: tuple[str, ...] = ()
    config_changes: tuple[str, ...] = ()  # config fields to pin when the hidden size changes ("head_dim")
    refuse: str = ""  # why width pruning would change this family's outputs beyond the removed channels
    # (config fields, reason): refused when the first of the fields the config has is true.
    refuse_when: tuple[tuple[tuple[str, ...], str], ...] = ()


@dataclass(frozen=True)
class Layout:
    """One registered family layout: what one transformer layer holds, and where the hidden size lives."""

    name: str
    attentions: tuple[AttentionLayout, ...]
    mlp: Optional[MlpLayout]
    hidden: Optional[HiddenLayout] = None  # None: width pruning not described for this family
    moe: Optional[MoeLayout] = None  # a mixture-of-experts block in place of `mlp`
    native_capable: bool = False  # Transformers 4.x implements prune_heads for it (config.pruned_heads)
    families: str = ""  # the Transformers model families it is known to cover, for messages and the README
    mlp_note: str = ""  # why FFN neurons cannot be removed, when `mlp` is None
    refuse: str = ""  # a family that matches but cannot be pruned structurally, and why
    requires: tuple[str, ...] = ()  # more paths that must exist in the layer (tells similar families apart)
    layer_class: str = ""  # a regular expression the layer's class name must match ("" matches any)

    def matches(self, layer: nn.Module) -> bool:
        if self.layer_class and not re.fullmatch(self.layer_class, type(layer).__name__):
            return False
        if not all(find_module(layer, p) is not None for p in self.requires):
            return False
        if not all(attention.matches(layer) for attention in self.attentions):
            return False
        if not any(attention.present(layer) for attention in self.attentions):
            return False
        if self.moe is not None and find_module(layer, self.moe.block) is None:
            return False
        return self.mlp is None or self.mlp.matches(layer)

    def attention_paths(self) -> tuple[str, ...]:
        return tuple(p for attention in self.attentions for p in attention.projections())

    def mlp_paths(self) -> tuple[str, ...]:
        return () if self.mlp is None else self.mlp.projections()

    def require_mlp(self) -> MlpLayout:
        if self.mlp is None:
            raise ValueError(
                f"hf_prune: FFN neuron removal is not available for the {self.name!r} layout ({self.families}): "
                f"{self.mlp_note or 'its feed-forward block is not described'}."
            )
        return self.mlp


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout, *, overwrite: bool = False, before: Optional[str] = None) -> Layout:
    """Register a family `Layout` so that structured pruning, importance, saving and `load_pruned` reach it.

    Layouts are tried in registration order and the first whose paths all exist in every layer of a stack wins;
    `before=name` inserts the new layout ahead of a registered one (a more specific layout ahead of a general one).
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"register_layout takes a hf_prune.structure.Layout, got {type(layout).__name__}.")
    if layout.name in _LAYOUTS and _LAYOUTS[layout.name] != layout and not overwrite:
        raise ValueError(f"A layout named {layout.name!r} is already registered; pass overwrite=True to replace it.")
    items = [(k, v) for k, v in _LAYOUTS.items() if k != layout.name]
    position = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
    items.insert(position, (layout.name, layout))
    _LAYOUTS.clear()
    _LAYOUTS.update(items)
    return layout


def unregister_layout(name: str) -> None:
    """Remove a registered layout (for tests and plugins that register temporarily)."""
    _LAYOUTS.pop(name, None)


def registered_layouts() -> tuple[Layout, ...]:
    """The registered layouts, in the order they are tried."""
    from . import layouts  # noqa: F401  (the built-in table registers itself on import)

    return tuple(_LAYOUTS.values())
