"""Physical removal of attention heads and FFN neurons, in place, in the ORIGINAL numbering.

Under Transformers 4.x the model's own `prune_heads` does the work where it exists and can (BERT, RoBERTa,
DistilBERT, GPT-2); hf_prune's implementation does it everywhere else: under Transformers 5.x, which dropped
`prune_heads`, for Llama-style models, and for layers that lose all their heads (Transformers' own code then crashes
at the next forward: "cannot reshape tensor of 0 elements"). After every change the structure is recorded in the
model's config (`record_structure`), so any `save_pretrained` carries it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn
from transformers.utils import logging

from .layout import (
    NEURONS_ATTR,
    Layout,
    find_layers,
    get_module,
    group_size_of,
    head_dim_of,
    kept_heads_of,
    kept_neurons_of,
    native_prune_heads_available,
    pruned_heads_of,
    pruned_neurons_of,
    set_module,
)
from .record import record_structure
from .slicing import channel_index, check_plain, in_width_of, keep_inputs, keep_outputs, out_width_of
from .standins import TRANSFORMERS_MAJOR, BiasOnly, EmptyAttention, NoHeadsSelfAttention, ZeroWidth

logger = logging.get_logger(__name__)

# Model types whose Transformers 4.x implementation rebuilds head-pruned shapes from `config.pruned_heads`.
_PRUNED_HEADS_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "gpt2")


def _config_records_heads(model: nn.Module, layout: Layout) -> bool:
    """Whether `config.pruned_heads` is kept in step with the model.

    Under 4.x wherever Transformers' own `prune_heads` applies: that is what rebuilds the shapes at load. Under 5.x,
    which ignores the field, for the model types 4.x rebuilds from it (and whenever a config loaded from a 4.x
    checkpoint carries it), so that a 5.x checkpoint stays loadable by 4.x and by `load_pruned` without
    `hf_prune_structure.json`. Never for Llama-style models: under 4.x a non-empty `config.pruned_heads` makes their
    `from_pretrained` call a `prune_heads` they do not implement.
    """
    if TRANSFORMERS_MAJOR < 5:
        return native_prune_heads_available(model, layout)
    config = model.config
    return layout.native_capable and (
        isinstance(getattr(config, "pruned_heads", None), dict)
        or getattr(config, "model_type", None) in _PRUNED_HEADS_MODEL_TYPES
    )


def sync_config_pruned_heads(model: nn.Module, layout: Layout, layers: nn.ModuleList) -> None:
    """Write `config.pruned_heads` (keyed by position in the current layer list) where `_config_records_heads`."""
    if not _config_records_heads(model, layout):
        return
    model.config.pruned_heads = {
        i: sorted(pruned_heads_of(layout, layer)) for i, layer in enumerate(layers) if pruned_heads_of(layout, layer)
    }


def _normalize_units(units: Optional[Mapping[Any, Iterable[int]]], num_layers: int, kind: str) -> dict[int, set[int]]:
    result: dict[int, set[int]] = {}
    for layer, indices in (units or {}).items():
        layer = int(layer)
        if not 0 <= layer < num_layers:
            raise ValueError(f"hf_prune: layer {layer} in the {kind} to prune does not exist (0 to {num_layers - 1}).")
        result.setdefault(layer, set()).update(int(i) for i in indices)
    return result


def _check_head_request(layout: Layout, layer_idx: int, layer: nn.Module, requested: set[int]) -> None:
    total = len(kept_heads_of(layout, layer)) + len(pruned_heads_of(layout, layer))
    bad = sorted(h for h in requested if not 0 <= h < total)
    if bad:
        raise ValueError(
            f"hf_prune: layer {layer_idx} has heads 0 to {total - 1} (original numbering); cannot prune {bad}."
        )
    group = group_size_of(layout, layer)
    if group == 1:
        return
    gone = requested | pruned_heads_of(layout, layer)
    for g in sorted({h // group for h in requested}):
        members = set(range(g * group, (g + 1) * group))
        if not members <= gone:
            raise ValueError(
                f"hf_prune: layer {layer_idx} uses grouped-query attention ({group} query heads per key/value head): "
                f"key/value group {g} (query heads {sorted(members)}) can only be removed whole, but heads "
                f"{sorted(members - gone)} would stay. Prune all of {sorted(members)} or none; "
                "select_heads_to_prune(..., group_size=...) selects whole groups."
            )


def _remove_heads_own(layout: Layout, layer: nn.Module, keep: list[int]) -> None:
    """hf_prune's own head removal; `keep` lists current head positions to keep (at least one)."""
    head_dim = head_dim_of(layout, layer)
    core = get_module(layer, layout.core)
    q_index = channel_index(keep, head_dim)
    if layout.fused_qkv:
        width = in_width_of(get_module(layer, layout.output))
        qkv_index = torch.cat([q_index, q_index + width, q_index + 2 * width])
        keep_outputs(get_module(layer, layout.fused_qkv), qkv_index, layout.fused_qkv)
    else:
        group = group_size_of(layout, layer)
        kv_keep = sorted({h // group for h in keep})
        kv_index = channel_index(kv_keep, head_dim)
        keep_outputs(get_module(layer, layout.query), q_index, layout.query)
        keep_outputs(get_module(layer, layout.key), kv_index, layout.key)
        keep_outputs(get_module(layer, layout.value), kv_index, layout.value)
        if hasattr(core, "num_key_value_heads"):  # not read by Llama's forward, but by some variants'
            core.num_key_value_heads = len(kv_keep)
    keep_inputs(get_module(layer, layout.output), q_index, layout.output)
    for attr in layout.head_count_attrs:
        if hasattr(core, attr) or not layout.grouped:
            setattr(core, attr, len(keep))
    for attr in layout.width_attrs:
        setattr(core, attr, len(keep) * head_dim)


def _output_bias(module: nn.Module) -> Optional[torch.Tensor]:
    return getattr(module, "bias", None)


def _empty_attention(layout: Layout, layer: nn.Module, pruned: set[int]) -> None:
    """Replace a layer's head computation by what it contributes without heads: the output-projection bias."""
    core = get_module(layer, layout.core)
    head_dim = head_dim_of(layout, layer)
    output = get_module(layer, layout.output)
    check_plain(output, layout.output)
    bias_only = BiasOnly(_output_bias(output), out_width_of(output))
    layer_idx = getattr(core, "layer_idx", None)
    if layout.core != layout.owner:
        # BERT-style: `attention.self` computes the heads, `attention.output` projects, adds and normalises.
        set_module(layer, layout.core, NoHeadsSelfAttention(head_dim, layer_idx))
        set_module(layer, layout.output, bias_only)
        get_module(layer, layout.owner).pruned_heads = set(pruned)
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
        legacy_distilbert=layout.name == "distilbert" and TRANSFORMERS_MAJOR < 5,
    )
    replacement.train(core.training)
    set_module(layer, layout.core, replacement)


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
    layout, layers = find_layers(model)
    requests = _normalize_units(heads, len(layers), "heads")
    native: dict[int, list[int]] = {}
    own: dict[int, list[int]] = {}
    for layer_idx, requested in sorted(requests.items()):
        layer = layers[layer_idx]
        _check_head_request(layout, layer_idx, layer, requested)
        new = requested - pruned_heads_of(layout, layer)
        if not new:
            continue
        remaining = [h for h in kept_heads_of(layout, layer) if h not in new]
        if remaining and native_prune_heads_available(model, layout):
            native[layer_idx] = sorted(new)
        else:
            own[layer_idx] = sorted(new)

    if native:
        _prune_heads_native(model, layout, layers, native)
    for layer_idx, new in own.items():
        layer = layers[layer_idx]
        kept = kept_heads_of(layout, layer)
        pruned = pruned_heads_of(layout, layer) | set(new)
        keep_positions = [pos for pos, h in enumerate(kept) if h not in pruned]
        if keep_positions:
            _remove_heads_own(layout, layer, keep_positions)
            get_module(layer, layout.owner).pruned_heads = pruned
        else:
            _empty_attention(layout, layer, pruned)
    if native or own:
        sync_config_pruned_heads(model, layout, layers)
        record_structure(model)
        logger.info("hf_prune: removed heads %s", dict(sorted({**native, **own}.items())))
    return model


def _prune_heads_native(
    model: nn.Module, layout: Layout, layers: nn.ModuleList, heads: dict[int, list[int]]
) -> None:
    """Transformers 4.x's own `prune_heads`, then restore what it does not preserve (dtype, requires_grad)."""
    paths = [p for p in (layout.query, layout.key, layout.value, layout.fused_qkv, layout.output) if p]
    before = {}
    for layer_idx in heads:
        for path in paths:
            module = get_module(layers[layer_idx], path)
            check_plain(module, path)
            flags = {name: p.requires_grad for name, p in module.named_parameters(recurse=False)}
            before[layer_idx, path] = (module.weight.dtype, flags)
    model.prune_heads(heads)
    for (layer_idx, path), (dtype, flags) in before.items():
        module = get_module(layers[layer_idx], path)
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
    layout, layers = find_layers(model)
    requests = _normalize_units(neurons, len(layers), "neurons")
    changed = {}
    for layer_idx, requested in sorted(requests.items()):
        layer = layers[layer_idx]
        pruned = pruned_neurons_of(layout, layer)
        kept = kept_neurons_of(layout, layer)
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
                keep_outputs(get_module(layer, path), index, path)
            keep_inputs(get_module(layer, layout.mlp_output), index, layout.mlp_output)
        else:
            for path in layout.mlp_inputs:
                module = get_module(layer, path)
                check_plain(module, path)
                set_module(layer, path, ZeroWidth(in_width_of(module)))
            output = get_module(layer, layout.mlp_output)
            check_plain(output, layout.mlp_output)
            set_module(layer, layout.mlp_output, BiasOnly(_output_bias(output), out_width_of(output)))
        owner = get_module(layer, layout.mlp_owner)
        setattr(owner, NEURONS_ATTR, pruned)
        if hasattr(owner, "intermediate_size"):
            owner.intermediate_size = len(keep_positions)
        changed[layer_idx] = len(new)
    if changed:
        record_structure(model)
        logger.info("hf_prune: removed FFN neurons per layer %s", changed)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Structures whose contribution is exactly zero
# ----------------------------------------------------------------------------------------------------------------
