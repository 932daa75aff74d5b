"""Where the heads, FFN neurons, layers and hidden channels of each architecture live (public: the layer view).

`find_layers(model)` returns the `Layout` of the model's architecture and its list of transformer layers; the
functions below read, for one layer, which heads and neurons it still has in the ORIGINAL numbering, which layers
are gone from the list (`original_layer_indices`), and where the residual stream is read and written
(`HiddenLayout`, for width pruning). Everything
else in `hf_prune.structure` (removal, empty-structure detection, summaries) and `hf_prune.units` (importance,
gradual masking) goes through this one view, so supporting a new architecture means adding one `Layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from .slicing import in_width_of, out_width_of
from .standins import TRANSFORMERS_MAJOR

NEURONS_ATTR = "hf_prune_pruned_neurons"

def get_module(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, value)


def module_path(root: nn.Module, module: nn.Module) -> str:
    """The dotted path of `module` inside `root` ("" for `root` itself)."""
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise ValueError(f"hf_prune: {type(module).__name__} is not a submodule of {type(root).__name__}.")


# ----------------------------------------------------------------------------------------------------------------
# Architecture layouts: where the heads and neurons of one transformer layer live
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Paths, relative to one transformer layer, of the modules structured pruning touches."""

    name: str
    owner: str  # module that carries `pruned_heads`
    core: str  # module computing the heads (replaced when no head is left)
    query: str  # "" for a fused q/k/v projection
    key: str
    value: str
    fused_qkv: str  # GPT-2's c_attn, "" otherwise
    output: str  # attention output projection; its input is the concatenated heads
    head_dim_attr: str
    head_count_attrs: tuple[str, ...]  # attributes of `core` holding the number of heads
    width_attrs: tuple[str, ...]  # attributes of `core` holding heads * head_dim
    mlp_owner: str  # module that carries `hf_prune_pruned_neurons`
    mlp_inputs: tuple[str, ...]  # projections whose outputs are the neurons (gate first when gated)
    mlp_output: str  # projection whose inputs are the neurons
    activation: str
    gated: bool = False
    grouped: bool = False  # grouped-query attention (keys/values shared by groups of query heads)
    native_capable: bool = False  # Transformers 4.x implements prune_heads for it

    def matches(self, layer: nn.Module) -> bool:
        try:
            get_module(layer, self.owner)
            get_module(layer, self.output)
            get_module(layer, self.mlp_output)
            for path in self.mlp_inputs:
                get_module(layer, path)
        except AttributeError:
            return False
        return True


LAYOUTS = (
    Layout(
        name="bert",
        owner="attention",
        core="attention.self",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        fused_qkv="",
        output="attention.output.dense",
        head_dim_attr="attention_head_size",
        head_count_attrs=("num_attention_heads",),
        width_attrs=("all_head_size",),
        mlp_owner="intermediate",
        mlp_inputs=("intermediate.dense",),
        mlp_output="output.dense",
        activation="intermediate.intermediate_act_fn",
        native_capable=True,
    ),
    Layout(
        name="distilbert",
        owner="attention",
        core="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        fused_qkv="",
        output="attention.out_lin",
        head_dim_attr="attention_head_size",
        head_count_attrs=("n_heads",),
        width_attrs=("dim",),
        mlp_owner="ffn",
        mlp_inputs=("ffn.lin1",),
        mlp_output="ffn.lin2",
        activation="ffn.activation",
        native_capable=True,
    ),
    Layout(
        name="gpt2",
        owner="attn",
        core="attn",
        query="",
        key="",
        value="",
        fused_qkv="attn.c_attn",
        output="attn.c_proj",
        head_dim_attr="head_dim",
        head_count_attrs=("num_heads",),
        width_attrs=("split_size",),
        mlp_owner="mlp",
        mlp_inputs=("mlp.c_fc",),
        mlp_output="mlp.c_proj",
        activation="mlp.act",
        native_capable=True,
    ),
    Layout(
        name="llama",
        owner="self_attn",
        core="self_attn",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        fused_qkv="",
        output="self_attn.o_proj",
        head_dim_attr="head_dim",
        head_count_attrs=("num_heads",),
        width_attrs=(),
        mlp_owner="mlp",
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
        mlp_output="mlp.down_proj",
        activation="mlp.act_fn",
        gated=True,
        grouped=True,
    ),
)


def find_layers(model: nn.Module) -> tuple[Layout, nn.ModuleList]:
    """The layout and the list of transformer layers (the list Transformers' `prune_heads` numbers)."""
    base = getattr(model, "base_model", model)
    for _, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for layout in LAYOUTS:
            if all(layout.matches(layer) for layer in module):
                return layout, module
    raise ValueError(
        f"hf_prune structured pruning supports BERT-style (BERT, RoBERTa), DistilBERT, GPT-2 and Llama-style "
        f"(Llama, Mistral, Qwen2) transformer layers; found none in {type(model).__name__}."
    )


def head_dim_of(layout: Layout, layer: nn.Module) -> int:
    return int(getattr(get_module(layer, layout.core), layout.head_dim_attr))


def num_heads_of(layout: Layout, layer: nn.Module) -> int:
    return in_width_of(get_module(layer, layout.output)) // head_dim_of(layout, layer)


def group_size_of(layout: Layout, layer: nn.Module) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    return int(getattr(get_module(layer, layout.core), "num_key_value_groups", 1)) if layout.grouped else 1


def pruned_heads_of(layout: Layout, layer: nn.Module) -> set[int]:
    return set(getattr(get_module(layer, layout.owner), "pruned_heads", set()) or set())


def kept_heads_of(layout: Layout, layer: nn.Module) -> list[int]:
    """Original indices of the heads still present, in the order of their channels."""
    pruned = pruned_heads_of(layout, layer)
    total = num_heads_of(layout, layer) + len(pruned)
    return [h for h in range(total) if h not in pruned]


def pruned_neurons_of(layout: Layout, layer: nn.Module) -> set[int]:
    return set(getattr(get_module(layer, layout.mlp_owner), NEURONS_ATTR, set()) or set())


def kept_neurons_of(layout: Layout, layer: nn.Module) -> list[int]:
    pruned = pruned_neurons_of(layout, layer)
    total = in_width_of(get_module(layer, layout.mlp_output)) + len(pruned)
    return [n for n in range(total) if n not in pruned]


@dataclass
class UnitSlot:
    """What importance scoring needs of one layer: where to hook and how channels map to original units."""

    layer_idx: int
    module: Optional[nn.Module]  # the output projection (heads) or down projection (neurons); None when empty
    unit_width: int  # channels per unit: head_dim for heads, 1 for neurons
    kept: list[int]  # original indices of the units present, in channel order
    total: int  # units in the original layer


def head_slots(model: nn.Module) -> list[UnitSlot]:
    layout, layers = find_layers(model)
    slots = []
    for i, layer in enumerate(layers):
        kept = kept_heads_of(layout, layer)
        total = len(kept) + len(pruned_heads_of(layout, layer))
        module = get_module(layer, layout.output) if kept else None
        slots.append(UnitSlot(i, module, head_dim_of(layout, layer), kept, total))
    return slots


def neuron_slots(model: nn.Module) -> list[UnitSlot]:
    layout, layers = find_layers(model)
    slots = []
    for i, layer in enumerate(layers):
        kept = kept_neurons_of(layout, layer)
        total = len(kept) + len(pruned_neurons_of(layout, layer))
        module = get_module(layer, layout.mlp_output) if kept else None
        slots.append(UnitSlot(i, module, 1, kept, total))
    return slots


def head_group_size(model: nn.Module) -> int:
    """Query heads that must be removed together (Llama-style grouped-query attention), 1 otherwise."""
    layout, layers = find_layers(model)
    return max(group_size_of(layout, layer) for layer in layers)


# ----------------------------------------------------------------------------------------------------------------
# Heads
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


def pruned_layers_of(layers: nn.ModuleList) -> set[int]:
    return set(getattr(layers, LAYERS_ATTR, set()) or set())


def original_layer_indices(model: nn.Module) -> list[int]:
    """The ORIGINAL index of each layer still present, in order (`[0, 1, ...]` until layers are removed).

    Layer keys of `prune_heads`, `prune_ffn_neurons` and the importance tensors are positions in the current layer
    list (what Transformers' own `prune_heads` and `config.pruned_heads` index); this maps them to the original layer
    numbers that `prune_layers` and the saved structure record use.
    """
    _, layers = find_layers(model)
    pruned = pruned_layers_of(layers)
    return [i for i in range(len(layers) + len(pruned)) if i not in pruned]


def pruned_hidden_of(model: nn.Module) -> set[int]:
    return set(getattr(getattr(model, "base_model", model), HIDDEN_ATTR, set()) or set())


def hidden_size_of(layout: Layout, layers: nn.ModuleList) -> int:
    """Width of the residual stream: what the attention output projection writes."""
    return out_width_of(get_module(layers[0], layout.output))


@dataclass(frozen=True)
class HiddenLayout:
    """Where the residual stream (hidden size) is read and written, beyond the per-layer projections of `Layout`.

    Paths are relative to the base model (`model.base_model`) unless named `layer_*` (relative to one layer).
    """

    embeddings: tuple[str, ...]  # nn.Embedding tables whose rows are hidden vectors
    norms: tuple[str, ...]  # LayerNorm / RMSNorm over the hidden size outside the layers
    layer_norms: tuple[str, ...]
    size_attrs: tuple[str, ...]  # "path.attribute" holding the hidden size, kept in step (bookkeeping only)
    layer_size_attrs: tuple[str, ...]
    model_types: tuple[str, ...]  # config.model_type values whose forward reads nothing else of the hidden size


HIDDEN_LAYOUTS = {
    "bert": HiddenLayout(
        embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
        norms=("embeddings.LayerNorm",),
        layer_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        size_attrs=(),
        layer_size_attrs=(),
        model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    ),
    "distilbert": HiddenLayout(
        embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings"),
        norms=("embeddings.LayerNorm",),
        layer_norms=("sa_layer_norm", "output_layer_norm"),
        size_attrs=(),
        layer_size_attrs=(),
        model_types=("distilbert",),
    ),
    "gpt2": HiddenLayout(
        embeddings=("wte", "wpe"),
        norms=("ln_f",),
        layer_norms=("ln_1", "ln_2"),
        size_attrs=(".embed_dim",),
        layer_size_attrs=("attn.embed_dim",),
        model_types=("gpt2",),
    ),
    "llama": HiddenLayout(
        embeddings=("embed_tokens",),
        norms=("norm",),
        layer_norms=("input_layernorm", "post_attention_layernorm"),
        size_attrs=(),
        layer_size_attrs=(".hidden_size", "mlp.hidden_size"),
        # Not Gemma-style models: they scale the embeddings by sqrt(hidden_size) in the forward.
        model_types=("llama", "mistral", "qwen2"),
    ),
}

# Task heads that read the last hidden states, relative to the whole model (the pooler relative to the base model).
# An adapter maps the hidden states into a space of its own (pooled, pre-classifier): its inputs are the residual
# stream, its outputs are not, so what reads them ("classifier" after an adapter) keeps its shape.
BASE_ADAPTERS = ("pooler.dense",)
HEAD_ADAPTERS = ("classifier.dense", "pre_classifier")
HEAD_READERS = ("qa_outputs", "score", "lm_head")
ADAPTED_READERS = ("classifier", "classifier.out_proj")  # read an adapter's output when there is one


def hidden_layout(model: nn.Module, layout: Layout) -> HiddenLayout:
    """The `HiddenLayout` of `model`, or a ValueError naming its model type and the supported ones."""
    spec = HIDDEN_LAYOUTS.get(layout.name)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec is None or model_type not in spec.model_types:
        supported = sorted(t for s in HIDDEN_LAYOUTS.values() for t in s.model_types)
        raise ValueError(
            f"hf_prune: width pruning supports model types {supported}; {type(model).__name__} has "
            f"model_type={model_type!r}."
        )
    return spec
