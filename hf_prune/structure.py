"""Structured pruning: attention heads and FFN neurons removed physically, and the smaller models saved and reloaded.

Unstructured zeros save nothing at inference; removing whole heads and FFN neurons shrinks the matrices themselves,
so the model is smaller and faster in PyTorch and in ONNX Runtime alike.

Numbering. Heads and neurons are always named by their index in the ORIGINAL, unpruned layer, as Transformers'
`prune_heads` and `config.pruned_heads` do, so repeated calls compose: pruning head 3 of a layer that already lost
head 1 removes the head that was number 3 in the checkpoint, and naming an already removed head again is a no-op.
What each layer has lost is kept on the model itself: `pruned_heads` (a set) on each attention module, the attribute
Transformers 4.x uses, and `hf_prune_pruned_neurons` (a set) on each MLP module.

Architectures: BERT-style (BERT, RoBERTa, ...), DistilBERT, GPT-2 and Llama-style (Llama, Mistral, Qwen2, ...,
grouped-query attention included). Under Transformers 4.x the model's own `prune_heads` does the work where it exists
and can (BERT, RoBERTa, DistilBERT, GPT-2); hf_prune's implementation does it everywhere else: under Transformers 5.x,
which dropped `prune_heads`, for Llama-style models, and for layers that lose all their heads (Transformers' own code
then crashes at the next forward: "cannot reshape tensor of 0 elements").

A layer without heads (or without FFN neurons) contributes exactly what the fully masked block contributed: the bias
of its output projection, broadcast over the tokens. Its attention (or MLP) is replaced by modules that compute just
that (`EmptyAttention`, `NoHeadsSelfAttention`, `ZeroWidth`, `BiasOnly`), with no zero-sized weights, so the model
saves with safetensors and exports like any other.

Saving and reloading. Transformers can rebuild a smaller model from its config alone only in one case: Transformers
4.x, head pruning of a model that implements `prune_heads`, no layer left without heads (`config.pruned_heads`). Then
plain `AutoModelFor*.from_pretrained` reloads it. Every other case (FFN neurons, Transformers 5.x, which ignores
`config.pruned_heads`, Llama-style models, layers without heads) needs `load_pruned`, which rebuilds the shapes from
`hf_prune_structure.json` (written by `save_structure`) and from `config.pruned_heads` when a 4.x checkpoint has it.
`structure_summary(model)["loads_with_from_pretrained"]` says which case a model is in. hf_prune keeps
`config.pruned_heads` in step under 5.x too (for the model types 4.x rebuilds from it), so such checkpoints still
load in 4.x, and `load_pruned` can rebuild head pruning from the config when the structure file is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import transformers
from torch import nn
from torch.nn.utils import parametrize
from transformers.utils import logging

from .masks import matrix_view

logger = logging.get_logger(__name__)

STRUCTURE_NAME = "hf_prune_structure.json"
STRUCTURE_FORMAT_VERSION = 1
NEURONS_ATTR = "hf_prune_pruned_neurons"

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


# ----------------------------------------------------------------------------------------------------------------
# Stand-ins for what is left of a block without heads or neurons
# ----------------------------------------------------------------------------------------------------------------


class BiasOnly(nn.Module):
    """A projection whose inputs are all gone: returns its bias (zeros without one) for every token.

    The bias keeps the parameter name of the projection it replaces (`...o_proj.bias`), so checkpoints stay readable.
    """

    def __init__(self, bias: Optional[torch.Tensor], out_features: int) -> None:
        super().__init__()
        self.in_features = 0
        self.out_features = out_features
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = hidden_states.new_zeros((*hidden_states.shape[:-1], self.out_features))
        # A fresh tensor, not an expanded view of the parameter, so later in-place ops cannot write into the bias.
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bias={self.bias is not None}"


class ZeroWidth(nn.Module):
    """A projection with no outputs left: returns a tensor whose last dimension is 0."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros((*hidden_states.shape[:-1], 0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features=0"


def _hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "query", "x"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    raise TypeError("hf_prune: an attention module without heads was called without hidden states.")


def _keep_cache_length(layer_idx: Optional[int], hidden_states: torch.Tensor, kwargs: dict) -> None:
    """Write a one-head, one-channel placeholder into the KV cache for a layer without heads.

    Generation reads the number of tokens seen from the cache of layer 0 (`cache.get_seq_length()`), and an empty
    tensor counts as no tokens at all, so a layer without heads must still grow its cache entry by the tokens it saw.
    The placeholder holds ones because static caches count the non-zero slots. It costs one scalar per token.
    """
    cache = None
    for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if kwargs.get(key) is not None:
            cache = kwargs[key]
            break
    if cache is None or layer_idx is None or not hasattr(cache, "update"):
        return
    cache = getattr(cache, "self_attention_cache", cache)
    placeholder = hidden_states.new_ones((hidden_states.shape[0], 1, hidden_states.shape[-2], 1))
    if _TRANSFORMERS_MAJOR < 5:
        cache.update(placeholder, placeholder, layer_idx, {"cache_position": kwargs.get("cache_position")})
    else:
        cache.update(placeholder, placeholder, layer_idx)


class NoHeadsSelfAttention(nn.Module):
    """BERT-style `attention.self` without heads: a context of width 0 (the output projection is a `BiasOnly`)."""

    def __init__(self, head_dim: int, layer_idx: Optional[int]) -> None:
        super().__init__()
        self.num_attention_heads = 0
        self.attention_head_size = head_dim
        self.all_head_size = 0
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        hidden_states = _hidden_states_of(args, kwargs)
        _keep_cache_length(self.layer_idx, hidden_states, kwargs)
        return hidden_states.new_zeros((*hidden_states.shape[:-1], 0)), None


class EmptyAttention(nn.Module):
    """A whole attention module (DistilBERT, GPT-2, Llama-style) without heads: output = output-projection bias.

    It keeps the output projection under its original name (as a `BiasOnly`), the bookkeeping attributes of the
    module it replaces (with head counts of 0), and the return convention of its Transformers version.
    """

    def __init__(
        self,
        output_name: str,
        output: BiasOnly,
        bookkeeping: Mapping[str, Any],
        pruned_heads: set[int],
        layer_idx: Optional[int],
        dropout: Optional[nn.Module] = None,
        legacy_distilbert: bool = False,
    ) -> None:
        super().__init__()
        self.output_name = output_name
        setattr(self, output_name, output)
        self.resid_dropout = dropout
        for name, value in bookkeeping.items():
            setattr(self, name, value)
        self.pruned_heads = set(pruned_heads)
        self.layer_idx = layer_idx
        # DistilBERT under Transformers 4.x returns (output,) or (output, weights); everything else (output, weights).
        self.legacy_distilbert = legacy_distilbert

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        hidden_states = _hidden_states_of(args, kwargs)
        _keep_cache_length(self.layer_idx, hidden_states, kwargs)
        out = getattr(self, self.output_name)(hidden_states[..., :0])
        if self.resid_dropout is not None:
            out = self.resid_dropout(out)
        if self.legacy_distilbert and not kwargs.get("output_attentions", False):
            return (out,)
        return out, None


# ----------------------------------------------------------------------------------------------------------------
# Slicing Linear / Conv1D layers in place
# ----------------------------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _check_plain(module: nn.Module, name: str) -> None:
    if parametrize.is_parametrized(module) or hasattr(module, "weight_orig"):
        raise ValueError(
            f"hf_prune: module {name!r} still carries a pruning mask (parametrization or torch.nn.utils.prune hook); "
            "call hf_prune.make_permanent(model) before removing structure."
        )


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))


def _keep_outputs(module: nn.Module, index: torch.Tensor, name: str) -> None:
    """Keep only output features `index` of a Linear or Conv1D, in place (dtype, device and hooks unchanged)."""
    _check_plain(module, name)
    index = index.to(module.weight.device)
    if _is_conv1d(module):
        _replace_parameter(module, "weight", module.weight.index_select(1, index))
        module.nf = len(index)
    else:
        _replace_parameter(module, "weight", module.weight.index_select(0, index))
        module.out_features = len(index)
    if module.bias is not None:
        _replace_parameter(module, "bias", module.bias.index_select(0, index))


def _keep_inputs(module: nn.Module, index: torch.Tensor, name: str) -> None:
    """Keep only input features `index` of a Linear or Conv1D, in place; the bias is untouched."""
    _check_plain(module, name)
    index = index.to(module.weight.device)
    if _is_conv1d(module):
        _replace_parameter(module, "weight", module.weight.index_select(0, index))
        module.nx = len(index)
    else:
        _replace_parameter(module, "weight", module.weight.index_select(1, index))
        module.in_features = len(index)


def _in_width(module: nn.Module) -> int:
    if isinstance(module, BiasOnly):
        return 0
    return matrix_view(module).shape[1]


def _out_width(module: nn.Module) -> int:
    if isinstance(module, ZeroWidth):
        return 0
    return matrix_view(module).shape[0]


def _channels(units: Sequence[int], width: int, offset: int = 0) -> torch.Tensor:
    """Channel indices of `units` (heads, groups) of `width` channels each."""
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offset + u * width, offset + (u + 1) * width) for u in units])


def _get(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


# ----------------------------------------------------------------------------------------------------------------
# Architecture layouts: where the heads and neurons of one transformer layer live
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
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
            _get(layer, self.owner)
            _get(layer, self.output)
            _get(layer, self.mlp_output)
            for path in self.mlp_inputs:
                _get(layer, path)
        except AttributeError:
            return False
        return True


_LAYOUTS = (
    _Layout(
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
    _Layout(
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
    _Layout(
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
    _Layout(
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


def _find_layers(model: nn.Module) -> tuple[_Layout, nn.ModuleList]:
    """The layout and the list of transformer layers (the list Transformers' `prune_heads` numbers)."""
    base = getattr(model, "base_model", model)
    for _, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for layout in _LAYOUTS:
            if all(layout.matches(layer) for layer in module):
                return layout, module
    raise ValueError(
        f"hf_prune structured pruning supports BERT-style (BERT, RoBERTa), DistilBERT, GPT-2 and Llama-style "
        f"(Llama, Mistral, Qwen2) transformer layers; found none in {type(model).__name__}."
    )


def _head_dim(layout: _Layout, layer: nn.Module) -> int:
    return int(getattr(_get(layer, layout.core), layout.head_dim_attr))


def _num_heads(layout: _Layout, layer: nn.Module) -> int:
    return _in_width(_get(layer, layout.output)) // _head_dim(layout, layer)


def _group_size(layout: _Layout, layer: nn.Module) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    return int(getattr(_get(layer, layout.core), "num_key_value_groups", 1)) if layout.grouped else 1


def _pruned_heads(layout: _Layout, layer: nn.Module) -> set[int]:
    return set(getattr(_get(layer, layout.owner), "pruned_heads", set()) or set())


def _kept_heads(layout: _Layout, layer: nn.Module) -> list[int]:
    """Original indices of the heads still present, in the order of their channels."""
    pruned = _pruned_heads(layout, layer)
    total = _num_heads(layout, layer) + len(pruned)
    return [h for h in range(total) if h not in pruned]


def _pruned_neurons(layout: _Layout, layer: nn.Module) -> set[int]:
    return set(getattr(_get(layer, layout.mlp_owner), NEURONS_ATTR, set()) or set())


def _kept_neurons(layout: _Layout, layer: nn.Module) -> list[int]:
    pruned = _pruned_neurons(layout, layer)
    total = _in_width(_get(layer, layout.mlp_output)) + len(pruned)
    return [n for n in range(total) if n not in pruned]


@dataclass
class _Slot:
    """What importance scoring needs of one layer: where to hook and how channels map to original units."""

    layer_idx: int
    module: Optional[nn.Module]  # the output projection (heads) or down projection (neurons); None when empty
    unit_width: int  # channels per unit: head_dim for heads, 1 for neurons
    kept: list[int]  # original indices of the units present, in channel order
    total: int  # units in the original layer


def _head_slots(model: nn.Module) -> list[_Slot]:
    layout, layers = _find_layers(model)
    slots = []
    for i, layer in enumerate(layers):
        kept = _kept_heads(layout, layer)
        total = len(kept) + len(_pruned_heads(layout, layer))
        module = _get(layer, layout.output) if kept else None
        slots.append(_Slot(i, module, _head_dim(layout, layer), kept, total))
    return slots


def _neuron_slots(model: nn.Module) -> list[_Slot]:
    layout, layers = _find_layers(model)
    slots = []
    for i, layer in enumerate(layers):
        kept = _kept_neurons(layout, layer)
        total = len(kept) + len(_pruned_neurons(layout, layer))
        module = _get(layer, layout.mlp_output) if kept else None
        slots.append(_Slot(i, module, 1, kept, total))
    return slots


def _head_group_size(model: nn.Module) -> int:
    """Query heads that must be removed together (Llama-style grouped-query attention), 1 otherwise."""
    layout, layers = _find_layers(model)
    return max(_group_size(layout, layer) for layer in layers)


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------


def _native_available(model: nn.Module, layout: _Layout) -> bool:
    """Transformers 4.x's own `prune_heads` can do (most of) the work for this model."""
    return (
        _TRANSFORMERS_MAJOR < 5
        and layout.native_capable
        and hasattr(model, "prune_heads")
        and hasattr(getattr(model, "base_model", model), "_prune_heads")
    )


# Model types whose Transformers 4.x implementation rebuilds head-pruned shapes from `config.pruned_heads`.
_PRUNED_HEADS_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "gpt2")


def _config_records_heads(model: nn.Module, layout: _Layout) -> bool:
    """Whether `config.pruned_heads` is kept in step with the model.

    Under 4.x wherever Transformers' own `prune_heads` applies: that is what rebuilds the shapes at load. Under 5.x,
    which ignores the field, for the model types 4.x rebuilds from it (and whenever a config loaded from a 4.x
    checkpoint carries it), so that a 5.x checkpoint stays loadable by 4.x and by `load_pruned` without
    `hf_prune_structure.json`. Never for Llama-style models: under 4.x a non-empty `config.pruned_heads` makes their
    `from_pretrained` call a `prune_heads` they do not implement.
    """
    if _TRANSFORMERS_MAJOR < 5:
        return _native_available(model, layout)
    config = model.config
    return layout.native_capable and (
        isinstance(getattr(config, "pruned_heads", None), dict)
        or getattr(config, "model_type", None) in _PRUNED_HEADS_MODEL_TYPES
    )


def _sync_config_pruned_heads(model: nn.Module, layout: _Layout, layers: nn.ModuleList) -> None:
    if not _config_records_heads(model, layout):
        return
    model.config.pruned_heads = {
        i: sorted(_pruned_heads(layout, layer)) for i, layer in enumerate(layers) if _pruned_heads(layout, layer)
    }


def _normalize_units(units: Optional[Mapping[Any, Iterable[int]]], num_layers: int, kind: str) -> dict[int, set[int]]:
    result: dict[int, set[int]] = {}
    for layer, indices in (units or {}).items():
        layer = int(layer)
        if not 0 <= layer < num_layers:
            raise ValueError(f"hf_prune: layer {layer} in the {kind} to prune does not exist (0 to {num_layers - 1}).")
        result.setdefault(layer, set()).update(int(i) for i in indices)
    return result


def _check_head_request(layout: _Layout, layer_idx: int, layer: nn.Module, requested: set[int]) -> None:
    total = len(_kept_heads(layout, layer)) + len(_pruned_heads(layout, layer))
    bad = sorted(h for h in requested if not 0 <= h < total)
    if bad:
        raise ValueError(
            f"hf_prune: layer {layer_idx} has heads 0 to {total - 1} (original numbering); cannot prune {bad}."
        )
    group = _group_size(layout, layer)
    if group == 1:
        return
    gone = requested | _pruned_heads(layout, layer)
    for g in sorted({h // group for h in requested}):
        members = set(range(g * group, (g + 1) * group))
        if not members <= gone:
            raise ValueError(
                f"hf_prune: layer {layer_idx} uses grouped-query attention ({group} query heads per key/value head): "
                f"key/value group {g} (query heads {sorted(members)}) can only be removed whole, but heads "
                f"{sorted(members - gone)} would stay. Prune all of {sorted(members)} or none; "
                "select_heads_to_prune(..., group_size=...) selects whole groups."
            )


def _remove_heads_own(layout: _Layout, layer: nn.Module, keep: list[int]) -> None:
    """hf_prune's own head removal; `keep` lists current head positions to keep (at least one)."""
    head_dim = _head_dim(layout, layer)
    core = _get(layer, layout.core)
    q_index = _channels(keep, head_dim)
    if layout.fused_qkv:
        width = _in_width(_get(layer, layout.output))
        qkv_index = torch.cat([q_index, q_index + width, q_index + 2 * width])
        _keep_outputs(_get(layer, layout.fused_qkv), qkv_index, layout.fused_qkv)
    else:
        group = _group_size(layout, layer)
        kv_keep = sorted({h // group for h in keep})
        kv_index = _channels(kv_keep, head_dim)
        _keep_outputs(_get(layer, layout.query), q_index, layout.query)
        _keep_outputs(_get(layer, layout.key), kv_index, layout.key)
        _keep_outputs(_get(layer, layout.value), kv_index, layout.value)
        if hasattr(core, "num_key_value_heads"):  # not read by Llama's forward, but by some variants'
            core.num_key_value_heads = len(kv_keep)
    _keep_inputs(_get(layer, layout.output), q_index, layout.output)
    for attr in layout.head_count_attrs:
        if hasattr(core, attr) or not layout.grouped:
            setattr(core, attr, len(keep))
    for attr in layout.width_attrs:
        setattr(core, attr, len(keep) * head_dim)


def _output_bias(module: nn.Module) -> Optional[torch.Tensor]:
    return getattr(module, "bias", None)


def _empty_attention(layout: _Layout, layer: nn.Module, pruned: set[int]) -> None:
    """Replace a layer's head computation by what it contributes without heads: the output-projection bias."""
    core = _get(layer, layout.core)
    head_dim = _head_dim(layout, layer)
    output = _get(layer, layout.output)
    _check_plain(output, layout.output)
    bias_only = BiasOnly(_output_bias(output), _out_width(output))
    layer_idx = getattr(core, "layer_idx", None)
    if layout.core != layout.owner:
        # BERT-style: `attention.self` computes the heads, `attention.output` projects, adds and normalises.
        _set(layer, layout.core, NoHeadsSelfAttention(head_dim, layer_idx))
        _set(layer, layout.output, bias_only)
        _get(layer, layout.owner).pruned_heads = set(pruned)
        return
    bookkeeping: dict[str, Any] = {layout.head_dim_attr: head_dim}
    for attr in layout.head_count_attrs + layout.width_attrs:
        bookkeeping[attr] = 0
    for attr in ("num_key_value_groups", "num_key_value_heads", "is_causal", "scaling"):
        if hasattr(core, attr):
            bookkeeping[attr] = getattr(core, attr)
    if hasattr(core, "num_key_value_heads"):
        bookkeeping["num_key_value_heads"] = 0
    output_name = layout.output.rpartition(".")[2]
    replacement = EmptyAttention(
        output_name,
        bias_only,
        bookkeeping,
        pruned,
        layer_idx,
        dropout=getattr(core, "resid_dropout", None),
        legacy_distilbert=layout.name == "distilbert" and _TRANSFORMERS_MAJOR < 5,
    )
    replacement.train(core.training)
    _set(layer, layout.core, replacement)


@torch.no_grad()
def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove attention heads physically, in place; returns `model`.

    Args:
        model: a Transformers model with BERT-style, DistilBERT, GPT-2 or Llama-style layers.
        heads: layer index -> head indices to remove, in the layer's ORIGINAL numbering (as `config.pruned_heads`).
            Heads already removed are ignored, so calls compose. A layer may lose all its heads: it then adds the
            output-projection bias only, exactly what the fully masked attention added. With grouped-query
            attention (Llama-style models with `num_key_value_heads < num_attention_heads`) a key/value head can
            only go together with all the query heads that share it: removing part of a group raises a ValueError
            naming the layer and group.

    Every attribute the forward reads (`num_attention_heads`, `attention_head_size`, `all_head_size`, `num_heads`,
    `split_size`, `n_heads`, `dim`, `num_key_value_heads`, ...) is updated; `num_key_value_groups` and `head_dim` do
    not change. `config.pruned_heads` is kept in step for the models Transformers 4.x rebuilds from it (BERT,
    RoBERTa, DistilBERT, GPT-2), under 4.x and 5.x; Llama-style configs are left alone. The pruned parameters are new
    tensors afterwards: build the optimizer after pruning.
    """
    layout, layers = _find_layers(model)
    requests = _normalize_units(heads, len(layers), "heads")
    native: dict[int, list[int]] = {}
    own: dict[int, list[int]] = {}
    for layer_idx, requested in sorted(requests.items()):
        layer = layers[layer_idx]
        _check_head_request(layout, layer_idx, layer, requested)
        new = requested - _pruned_heads(layout, layer)
        if not new:
            continue
        remaining = [h for h in _kept_heads(layout, layer) if h not in new]
        if remaining and _native_available(model, layout):
            native[layer_idx] = sorted(new)
        else:
            own[layer_idx] = sorted(new)

    if native:
        _prune_heads_native(model, layout, layers, native)
    for layer_idx, new in own.items():
        layer = layers[layer_idx]
        kept = _kept_heads(layout, layer)
        pruned = _pruned_heads(layout, layer) | set(new)
        keep_positions = [pos for pos, h in enumerate(kept) if h not in pruned]
        if keep_positions:
            _remove_heads_own(layout, layer, keep_positions)
            _get(layer, layout.owner).pruned_heads = pruned
        else:
            _empty_attention(layout, layer, pruned)
    if native or own:
        _sync_config_pruned_heads(model, layout, layers)
        logger.info("hf_prune: removed heads %s", dict(sorted({**native, **own}.items())))
    return model


def _prune_heads_native(
    model: nn.Module, layout: _Layout, layers: nn.ModuleList, heads: dict[int, list[int]]
) -> None:
    """Transformers 4.x's own `prune_heads`, then restore what it does not preserve (dtype, requires_grad)."""
    paths = [p for p in (layout.query, layout.key, layout.value, layout.fused_qkv, layout.output) if p]
    before = {}
    for layer_idx in heads:
        for path in paths:
            module = _get(layers[layer_idx], path)
            _check_plain(module, path)
            flags = {name: p.requires_grad for name, p in module.named_parameters(recurse=False)}
            before[layer_idx, path] = (module.weight.dtype, flags)
    model.prune_heads(heads)
    for (layer_idx, path), (dtype, flags) in before.items():
        module = _get(layers[layer_idx], path)
        # Transformers' prune_linear_layer builds a float32 layer whatever the model's dtype.
        module.to(dtype=dtype)
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(flags.get(name, True))


# ----------------------------------------------------------------------------------------------------------------
# FFN neurons
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def prune_ffn_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove FFN (MLP) neurons physically, in place; returns `model`.

    Args:
        model: a Transformers model with BERT-style, DistilBERT, GPT-2 or Llama-style layers.
        neurons: layer index -> neuron indices (rows of the up projection, columns of the down projection) in the
            layer's ORIGINAL numbering. Already removed neurons are ignored, so calls compose. Gated MLPs lose the
            same rows of `gate_proj` and `up_proj` and columns of `down_proj`. A layer may lose all neurons: its MLP
            then adds the down-projection bias only.

    The intermediate size then differs per layer, which no Transformers config can express: reload with
    `load_pruned` (after `save_structure`).
    """
    layout, layers = _find_layers(model)
    requests = _normalize_units(neurons, len(layers), "neurons")
    changed = {}
    for layer_idx, requested in sorted(requests.items()):
        layer = layers[layer_idx]
        pruned = _pruned_neurons(layout, layer)
        kept = _kept_neurons(layout, layer)
        total = len(kept) + len(pruned)
        bad = sorted(n for n in requested if not 0 <= n < total)
        if bad:
            raise ValueError(
                f"hf_prune: layer {layer_idx} has FFN neurons 0 to {total - 1} (original numbering); cannot prune "
                f"{bad[:10]}{' ...' if len(bad) > 10 else ''}."
            )
        new = requested - pruned
        if not new:
            continue
        pruned = pruned | new
        keep_positions = [pos for pos, n in enumerate(kept) if n not in pruned]
        if keep_positions:
            index = torch.tensor(keep_positions, dtype=torch.long)
            for path in layout.mlp_inputs:
                _keep_outputs(_get(layer, path), index, path)
            _keep_inputs(_get(layer, layout.mlp_output), index, layout.mlp_output)
        else:
            for path in layout.mlp_inputs:
                module = _get(layer, path)
                _check_plain(module, path)
                _set(layer, path, ZeroWidth(_in_width(module)))
            output = _get(layer, layout.mlp_output)
            _check_plain(output, layout.mlp_output)
            _set(layer, layout.mlp_output, BiasOnly(_output_bias(output), _out_width(output)))
        owner = _get(layer, layout.mlp_owner)
        setattr(owner, NEURONS_ATTR, pruned)
        if hasattr(owner, "intermediate_size"):
            owner.intermediate_size = len(keep_positions)
        changed[layer_idx] = len(new)
    if changed:
        logger.info("hf_prune: removed FFN neurons per layer %s", changed)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Structures whose contribution is exactly zero
# ----------------------------------------------------------------------------------------------------------------


def _all_zero(tensor: Optional[torch.Tensor]) -> bool:
    return tensor is None or not bool(tensor.any())


def _value_projection(layout: _Layout, layer: nn.Module) -> tuple[nn.Module, int]:
    if layout.fused_qkv:
        return _get(layer, layout.fused_qkv), 2 * _in_width(_get(layer, layout.output))
    return _get(layer, layout.value), 0


def _empty_heads(layout: _Layout, layer: nn.Module) -> list[int]:
    """Original indices of heads (whole groups under GQA) whose contribution to the layer output is exactly zero.

    A head contributes nothing when its columns of the output projection are all zero, or when its value rows and
    value bias are all zero (its context is then zero whatever the attention pattern). Zero queries or keys do not
    qualify: they make the attention uniform, not absent.
    """
    kept = _kept_heads(layout, layer)
    if not kept:
        return []
    head_dim = _head_dim(layout, layer)
    out_w = matrix_view(_get(layer, layout.output)).detach()
    v_module, offset = _value_projection(layout, layer)
    v_w = matrix_view(v_module).detach()
    v_b = v_module.bias.detach() if v_module.bias is not None else None
    group = _group_size(layout, layer)

    def value_zero(unit: int) -> bool:
        rows = slice(offset + unit * head_dim, offset + (unit + 1) * head_dim)
        return _all_zero(v_w[rows]) and (v_b is None or _all_zero(v_b[rows]))

    def output_zero(pos: int) -> bool:
        return _all_zero(out_w[:, pos * head_dim : (pos + 1) * head_dim])

    empty = []
    if group == 1:
        for pos, head in enumerate(kept):
            if output_zero(pos) or value_zero(pos):
                empty.append(head)
        return empty
    kv_kept = sorted({h // group for h in kept})
    for kv_pos, g in enumerate(kv_kept):
        members = [(pos, h) for pos, h in enumerate(kept) if h // group == g]
        if value_zero(kv_pos) or all(output_zero(pos) for pos, _ in members):
            empty.extend(h for _, h in members)
    return empty


def _activation_is_zero_at_zero(activation: Any) -> bool:
    try:
        return bool(activation(torch.zeros(1)).abs().max() == 0)
    except Exception:  # an activation we cannot evaluate on its own: do not rely on it
        return False


def _empty_neurons(layout: _Layout, layer: nn.Module) -> list[int]:
    """Original indices of FFN neurons whose contribution is exactly zero.

    A neuron contributes nothing when its down-projection column is zero; or when its input row and bias are zero
    and the activation maps 0 to 0 (ReLU, GELU, SiLU); in a gated MLP also when its up-projection row and bias are
    zero (the product is then zero whatever the gate).
    """
    kept = _kept_neurons(layout, layer)
    if not kept:
        return []
    down = matrix_view(_get(layer, layout.mlp_output)).detach()
    zero = ~down.any(dim=0)

    def input_zero(path: str) -> torch.Tensor:
        module = _get(layer, path)
        rows_zero = ~matrix_view(module).detach().any(dim=1)
        if module.bias is not None:
            rows_zero &= module.bias.detach() == 0
        return rows_zero

    act_zero = _activation_is_zero_at_zero(_get(layer, layout.activation))
    if layout.gated:
        gate_path, up_path = layout.mlp_inputs
        zero |= input_zero(up_path)
        if act_zero:
            zero |= input_zero(gate_path)
    elif act_zero:
        zero |= input_zero(layout.mlp_inputs[0])
    return [kept[pos] for pos in torch.nonzero(zero).flatten().tolist()]


@torch.no_grad()
def remove_empty_structures(model: nn.Module) -> dict[str, dict[int, list[int]]]:
    """Find heads and FFN neurons whose contribution is exactly zero and remove them physically, in place.

    What block or row/column movement pruning leaves behind (nn_pruning's `optimize_model`): the outputs are
    unchanged up to float rounding, the matrices smaller. Only exact zeros count.

    Returns:
        {"heads": {layer: [original head indices removed]}, "neurons": {layer: [original neuron indices removed]}},
        listing only layers where something was removed.
    """
    layout, layers = _find_layers(model)
    heads = {i: _empty_heads(layout, layer) for i, layer in enumerate(layers)}
    neurons = {i: _empty_neurons(layout, layer) for i, layer in enumerate(layers)}
    heads = {i: h for i, h in heads.items() if h}
    neurons = {i: n for i, n in neurons.items() if n}
    if heads:
        prune_heads(model, heads)
    if neurons:
        prune_ffn_neurons(model, neurons)
    return {"heads": heads, "neurons": neurons}


# ----------------------------------------------------------------------------------------------------------------
# Summary, saving, loading
# ----------------------------------------------------------------------------------------------------------------


def structure_summary(model: nn.Module) -> dict:
    """The model's structure after pruning, for logs, model cards and `hf_prune_structure.json`.

    Returns:
        {"architecture", "num_layers", "num_attention_heads" (original, per layer), "heads_per_layer",
        "pruned_heads" {layer: [original indices]}, "key_value_heads_per_layer", "head_group_size",
        "intermediate_size" (original), "intermediate_sizes", "pruned_neurons" {layer: [original indices]},
        "parameters", "loads_with_from_pretrained"}.
    """
    layout, layers = _find_layers(model)
    heads_per_layer, kv_per_layer, pruned_heads, sizes, pruned_neurons = [], [], {}, [], {}
    original_heads = original_size = 0
    for i, layer in enumerate(layers):
        kept = _kept_heads(layout, layer)
        group = _group_size(layout, layer)
        heads_per_layer.append(len(kept))
        kv_per_layer.append(len({h // group for h in kept}))
        original_heads = max(original_heads, len(kept) + len(_pruned_heads(layout, layer)))
        if _pruned_heads(layout, layer):
            pruned_heads[i] = sorted(_pruned_heads(layout, layer))
        kept_neurons = _kept_neurons(layout, layer)
        sizes.append(len(kept_neurons))
        original_size = max(original_size, len(kept_neurons) + len(_pruned_neurons(layout, layer)))
        if _pruned_neurons(layout, layer):
            pruned_neurons[i] = sorted(_pruned_neurons(layout, layer))
    loads_plainly = not pruned_neurons and (
        not pruned_heads
        or (_native_available(model, layout) and all(heads_per_layer) and _config_matches(model, pruned_heads))
    )
    return {
        "architecture": layout.name,
        "num_layers": len(layers),
        "num_attention_heads": original_heads,
        "heads_per_layer": heads_per_layer,
        "pruned_heads": pruned_heads,
        "key_value_heads_per_layer": kv_per_layer,
        "head_group_size": max(_group_size(layout, layer) for layer in layers),
        "intermediate_size": original_size,
        "intermediate_sizes": sizes,
        "pruned_neurons": pruned_neurons,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loads_with_from_pretrained": bool(loads_plainly),
    }


def _config_matches(model: nn.Module, pruned_heads: dict[int, list[int]]) -> bool:
    recorded = _int_keys(getattr(model.config, "pruned_heads", None) or {})
    return {k: sorted(set(v)) for k, v in recorded.items() if v} == pruned_heads


def _int_keys(mapping: Mapping[Any, Iterable[int]]) -> dict[int, list[int]]:
    return {int(k): sorted({int(i) for i in v}) for k, v in mapping.items()}


def save_structure(model: nn.Module, directory: str) -> str:
    """Write `hf_prune_structure.json` (heads and neurons removed per layer, resulting sizes) into `directory`.

    Call it next to `model.save_pretrained(directory)`; `load_pruned(directory)` reads it back. Returns its path.
    """
    from . import __version__

    os.makedirs(directory, exist_ok=True)
    summary = structure_summary(model)
    payload = {
        "format_version": STRUCTURE_FORMAT_VERSION,
        "hf_prune_version": __version__,
        "transformers_version": transformers.__version__,
        **summary,
        "pruned_heads": {str(k): v for k, v in summary["pruned_heads"].items()},
        "pruned_neurons": {str(k): v for k, v in summary["pruned_neurons"].items()},
    }
    path = os.path.join(directory, STRUCTURE_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def save_pruned(model: nn.Module, directory: str, **save_pretrained_kwargs: Any) -> str:
    """`model.save_pretrained(directory, ...)` plus `save_structure`: everything `load_pruned` needs."""
    model.save_pretrained(directory, **save_pretrained_kwargs)
    return save_structure(model, directory)


_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
_BUILD_KWARGS = ("dtype", "torch_dtype", "attn_implementation")


def _resolve_directory(path_or_repo_id: str, hub_kwargs: dict) -> str:
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    from huggingface_hub import snapshot_download

    return snapshot_download(
        path_or_repo_id, allow_patterns=["*.json", "*.safetensors"], **hub_kwargs
    )


def _read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return state
    raise FileNotFoundError(
        f"hf_prune.load_pruned: no model.safetensors (or model.safetensors.index.json) in {directory!r}; save the "
        "model with save_pretrained(..., safe_serialization=True)."
    )


def _model_class(config: Any, model_class: Optional[type]) -> type:
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(
        f"hf_prune.load_pruned: the config names no model class this Transformers version provides "
        f"(architectures={architectures}); pass model_class=, e.g. AutoModelForSequenceClassification."
    )


def _load_state_strictly(model: nn.Module, state: dict[str, torch.Tensor], directory: str) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    # Tied parameters (an LM head sharing the embedding) are saved once, under one of their names.
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    aliases = {name: names for names in names_of.values() for name in names}
    missing = sorted(
        k for k in set(expected) - set(state) if not any(alias in state for alias in aliases.get(k, []))
    )
    if unexpected or mismatched or missing:
        details = [] if os.path.isfile(os.path.join(directory, STRUCTURE_NAME)) else [f"no {STRUCTURE_NAME} found"]
        if mismatched:
            details.append(f"shape mismatches: {mismatched[:8]}")
        if missing:
            details.append(f"missing from the checkpoint: {missing[:8]}")
        if unexpected:
            details.append(f"not in the rebuilt model: {unexpected[:8]}")
        raise ValueError(
            f"hf_prune.load_pruned: the weights in {directory!r} do not fit the model rebuilt from its config and "
            f"{STRUCTURE_NAME} ({'; '.join(details)}). The structure file (or config.pruned_heads) must describe "
            "these weights: save with hf_prune.save_pruned (or save_structure after save_pretrained), and load with "
            "the model class that was saved."
        )
    model.load_state_dict(state, strict=False)


def load_pruned(
    path_or_repo_id: str, model_class: Optional[type] = None, **from_pretrained_kwargs: Any
) -> nn.Module:
    """Load a structurally pruned checkpoint: rebuild the shapes, then load the weights strictly.

    The model is built from `config.json` (class from `config.architectures` when `model_class` is None), the heads
    and neurons recorded in `hf_prune_structure.json` and in `config.pruned_heads` (what Transformers 4.x writes,
    which 5.x ignores) are removed, and the safetensors weights are loaded; any missing, unexpected or mis-shaped
    tensor raises a ValueError. Works for checkpoints saved under Transformers 4.x and 5.x alike.

    Args:
        path_or_repo_id: a local directory or a Hub repo id.
        model_class: a Transformers model class or Auto class; default from `config.architectures`.
        from_pretrained_kwargs: `revision`, `cache_dir`, `token`, `local_files_only`, `force_download` (Hub);
            `dtype` (or `torch_dtype`), `attn_implementation` (model).

    Returns:
        The model in eval mode, as `from_pretrained` returns it.
    """
    from transformers import AutoConfig

    unknown = sorted(set(from_pretrained_kwargs) - set(_HUB_KWARGS) - set(_BUILD_KWARGS))
    if unknown:
        raise TypeError(
            f"hf_prune.load_pruned got unsupported arguments {unknown}; supported: {list(_HUB_KWARGS + _BUILD_KWARGS)}."
        )
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    build_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _BUILD_KWARGS}
    directory = _resolve_directory(str(path_or_repo_id), hub_kwargs)

    config = AutoConfig.from_pretrained(directory)
    structure: dict = {}
    structure_path = os.path.join(directory, STRUCTURE_NAME)
    if os.path.isfile(structure_path):
        with open(structure_path, encoding="utf-8") as handle:
            structure = json.load(handle)
        if int(structure.get("format_version", 1)) > STRUCTURE_FORMAT_VERSION:
            raise ValueError(
                f"hf_prune.load_pruned: {structure_path} has format_version {structure['format_version']}; this "
                f"hf_prune reads up to {STRUCTURE_FORMAT_VERSION}. Upgrade hf_prune."
            )
    heads = _int_keys(structure.get("pruned_heads", {}))
    for layer, recorded in _int_keys(getattr(config, "pruned_heads", None) or {}).items():
        heads[layer] = sorted(set(heads.get(layer, [])) | set(recorded))
    neurons = _int_keys(structure.get("pruned_neurons", {}))
    if isinstance(getattr(config, "pruned_heads", None), dict):
        # Build unpruned (4.x would otherwise apply config.pruned_heads itself, and crash on layers without heads);
        # prune_heads below records them again.
        config.pruned_heads = {}

    cls = _model_class(config, model_class)
    if cls.__name__.startswith("Auto"):
        model = cls.from_config(config, **build_kwargs)
    else:
        model = cls._from_config(config, **build_kwargs)
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    if structure:
        summary = structure_summary(model)
        for key in ("heads_per_layer", "intermediate_sizes"):
            if key in structure and structure[key] != summary[key]:
                raise ValueError(
                    f"hf_prune.load_pruned: {STRUCTURE_NAME} records {key}={structure[key]} but rebuilding gave "
                    f"{summary[key]}; the structure file does not belong to this config."
                )
    # load_state_dict copies into the existing tensors, so tied parameters stay tied and dtypes follow the model.
    _load_state_strictly(model, _read_safetensors(directory), directory)
    generation_config = os.path.join(directory, "generation_config.json")
    if getattr(model, "generation_config", None) is not None and os.path.isfile(generation_config):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.config._name_or_path = str(path_or_repo_id)
    model.eval()
    return model
