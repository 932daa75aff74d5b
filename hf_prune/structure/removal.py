"""Physical removal of attention heads and FFN neurons, in place, in the ORIGINAL numbering.

Under Transformers 4.x the model's own `prune_heads` does the work where it exists and can (BERT, RoBERTa,
DistilBERT, GPT-2); hf_prune's implementation does it everywhere else: under Transformers 5.x, which dropped
`prune_heads`, for Llama-style models, and for layers that lose all their heads (Transformers' own code then crashes
at the next forward: "cannot reshape tensor of 0 elements"). After every change the structure is recorded in the
model's config (`record_structure`), so any `save_pretrained` carries it.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn
from transformers.utils import logging

from .experts import prune_moe_neurons
from .head_inputs import select_head_inputs, share_position_bias
from .layout import (
    NEURONS_ATTR,
    AttentionSite,
    attention_sites,
    find_layers,
    group_size_of,
    head_dim_of,
    kept_heads_of,
    kept_neurons_of,
    native_prune_heads_available,
    normalize_units,
    num_heads_of,
    pruned_heads_of,
    pruned_neurons_of,
    qkv_group_rows,
    qkv_rows,
)
from .paths import find_module, get_module, set_module
from .record import record_structure
from .slicing import channel_index, check_plain, in_width_of, keep_inputs, keep_outputs, out_width_of
from .spec import AttentionLayout, Layout
from .standins import TRANSFORMERS_MAJOR, BiasOnly, EmptyAttention, NoHeadsSelfAttention, ZeroWidth

logger = logging.get_logger(__name__)

# Model types whose Transformers 4.x implementation rebuilds head-pruned shapes from `config.pruned_heads`.
_PRUNED_HEADS_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "gpt2")


def _config_records_heads(model: nn.Module, layout: Layout) -> bool:
    """Whether `config.pruned_heads` is kept in step with the model.

    Under 4.x wherever Transformers' own `prune_heads` applies: that is what rebuilds the shapes at load. Under 5.x,
    which ignores the field, for the model types 4.x rebuilds from it (and whenever a config loaded from a 4.x
    checkpoint carries it), so that a 5.x checkpoint stays loadable by 4.x and by `load_pruned` without
    `hf_prune_structure.json`. Never for other layouts: under 4.x a non-empty `config.pruned_heads` makes their
    `from_pretrained` call a `prune_heads` they may not implement.
    """
    if TRANSFORMERS_MAJOR < 5:
        return native_prune_heads_available(model, layout)
    config = model.config
    return layout.native_capable and (
        isinstance(getattr(config, "pruned_heads", None), dict)
        or getattr(config, "model_type", None) in _PRUNED_HEADS_MODEL_TYPES
    )


def sync_config_pruned_heads(model: nn.Module, layout: Layout, layers: Any) -> None:
    """Write `config.pruned_heads` (keyed by position in the current layer list) where `_config_records_heads`."""
    if not _config_records_heads(model, layout):
        return
    spec = layout.attentions[0]
    model.config.pruned_heads = {
        i: sorted(pruned_heads_of(spec, layer)) for i, layer in enumerate(layers) if pruned_heads_of(spec, layer)
    }


def _check_head_request(
    spec: AttentionLayout, index: int, layer: nn.Module, requested: set[int], where: str
) -> None:
    total = len(kept_heads_of(spec, layer)) + len(pruned_heads_of(spec, layer))
    bad = sorted(h for h in requested if not 0 <= h < total)
    if bad:
        raise ValueError(
            f"hf_prune: {where} {index} has heads 0 to {total - 1} (original numbering); cannot prune {bad}."
        )
    group = group_size_of(spec, layer)
    if group == 1:
        return
    gone = requested | pruned_heads_of(spec, layer)
    for g in sorted({h // group for h in requested}):
        members = set(range(g * group, (g + 1) * group))
        if not members <= gone:
            raise ValueError(
                f"hf_prune: {where} {index} uses grouped-query attention ({group} query heads per key/value "
                f"head): key/value group {g} (query heads {sorted(members)}) can only be removed whole, but heads "
                f"{sorted(members - gone)} would stay. Prune all of {sorted(members)} or none; "
                "select_heads_to_prune(..., group_size=...) selects whole groups."
            )


def _set_present(module: nn.Module, attrs: tuple[str, ...], value: int) -> None:
    for attr in attrs:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def _own_config(core: nn.Module, spec: AttentionLayout, heads: int, kv: int) -> None:
    """Give the block a private config holding its own head counts, for forwards that read them from the config."""
    config = getattr(core, "config", None)
    if not spec.config_counts or config is None:
        return
    if not getattr(core, "hf_prune_own_config", False):
        config = copy.copy(config)
        core.config = config
        core.hf_prune_own_config = True
    for field, kind in spec.config_counts:
        if hasattr(config, field):
            setattr(config, field, heads if kind == "heads" else kv)


def _remove_heads_own(spec: AttentionLayout, layer: nn.Module, keep: list[int], original: list[int]) -> None:
    """hf_prune's own head removal; `keep` lists current head positions to keep (at least one), `original` their
    original indices."""
    head_dim = head_dim_of(spec, layer)
    core = get_module(layer, spec.core)
    group = group_size_of(spec, layer)
    total = num_heads_of(spec, layer) + len(pruned_heads_of(spec, layer))  # original heads of the block
    kv_keep = sorted({h // group for h in keep})
    q_index = channel_index(keep, head_dim)
    if spec.qkv:
        if spec.packing(layer) == "per_group":
            rows = qkv_group_rows(spec, layer, kv_keep)
        else:
            rows = torch.cat([qkv_rows(spec, layer, part, keep if part == "q" else kv_keep) for part in "qkv"])
        keep_outputs(get_module(layer, spec.qkv), rows, spec.qkv)
    else:
        kv_index = channel_index(kv_keep, head_dim)
        keep_outputs(get_module(layer, spec.query), q_index, spec.query)
        keep_outputs(get_module(layer, spec.key), kv_index, spec.key)
        keep_outputs(get_module(layer, spec.value), kv_index, spec.value)
    for path in spec.extra_heads:
        module = find_module(layer, path)
        if module is not None:
            keep_outputs(module, q_index, path)
    keep_inputs(get_module(layer, spec.output), q_index, spec.output)
    _set_present(core, spec.count_attrs, len(keep))
    _set_present(core, spec.width_attrs, len(keep) * head_dim)
    _set_present(core, spec.kv_count_attrs, len(kv_keep))
    _own_config(core, spec, len(keep), len(kv_keep))
    select_head_inputs(core, spec.head_inputs, original)
    if spec.shared_position_bias:
        share_position_bias(core, original, total)


def _output_bias(module: nn.Module) -> Optional[torch.Tensor]:
    return getattr(module, "bias", None)


def _empty_attention(spec: AttentionLayout, layout: Layout, layer: nn.Module, pruned: set[int]) -> None:
    """Replace a block's head computation by what it contributes without heads: the output-projection bias."""
    core = get_module(layer, spec.core)
    head_dim = head_dim_of(spec, layer)
    group = group_size_of(spec, layer)
    output = get_module(layer, spec.output)
    check_plain(output, spec.output)
    bias_only = BiasOnly(_output_bias(output), out_width_of(output))
    layer_idx = getattr(core, "layer_idx", None)
    select_head_inputs(core, (), [])
    if not spec.output.startswith(spec.core + "."):
        # BERT-style: `attention.self` computes the heads, `attention.output` projects, adds and normalises.
        set_module(layer, spec.core, NoHeadsSelfAttention(head_dim, layer_idx))
        set_module(layer, spec.output, bias_only)
        get_module(layer, spec.owner).pruned_heads = set(pruned)
        return
    bookkeeping: dict[str, Any] = {"head_dim": head_dim, "hf_prune_group_size": group}
    for attr in spec.head_dim_attrs:
        if isinstance(getattr(core, attr, None), int):
            bookkeeping[attr] = getattr(core, attr)
    for attr in spec.count_attrs + spec.width_attrs + spec.kv_count_attrs:
        if isinstance(getattr(core, attr, None), int):
            bookkeeping[attr] = 0
    for attr in ("num_key_value_groups", "is_causal", "scaling", "is_decoder"):
        if hasattr(core, attr):
            bookkeeping[attr] = getattr(core, attr)
    output_name = spec.output[len(spec.core) + 1:]
    replacement = EmptyAttention(
        output_name,
        bias_only,
        bookkeeping,
        pruned,
        layer_idx,
        dropout=getattr(core, "resid_dropout", None),
        legacy_distilbert=layout.name == "distilbert" and TRANSFORMERS_MAJOR < 5,
    )
    replacement.keeps_cache = not spec.cross
    replacement.outputs = spec.outputs
    replacement.train(core.training)
    set_module(layer, spec.core, replacement)
    if spec.owner != spec.core:
        get_module(layer, spec.owner).pruned_heads = set(pruned)


@torch.no_grad()
def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove attention heads physically, in place; returns `model`.

    Args:
        model: a Transformers model of a registered layout (`hf_prune.structure.registered_layouts()`).
        heads: attention block -> head indices to remove, in the block's ORIGINAL numbering (as
            `config.pruned_heads`). Attention blocks are numbered as `attention_sites(model)` lists them: one per
            layer for encoder-only and decoder-only models (the block index is the layer index), and a decoder
            layer's cross-attention right after its self-attention in encoder-decoder models. Heads already
            removed are ignored, so calls compose. A block may lose all its heads: it then adds the
            output-projection bias only, exactly what the fully masked attention added. With grouped-query
            attention a key/value head can only go together with all the query heads that share it: removing part
            of a group raises a ValueError naming the block and group.

    Every attribute the forward reads (`num_attention_heads`, `attention_head_size`, `all_head_size`, `num_heads`,
    `split_size`, `n_heads`, `dim`, `num_key_value_heads`, ...) is updated; `num_key_value_groups` and `head_dim` do
    not change. `config.pruned_heads` is kept in step for the models Transformers 4.x rebuilds from it (BERT,
    RoBERTa, DistilBERT, GPT-2); other configs are left alone. The pruned parameters are new tensors afterwards:
    build the optimizer after pruning.
    """
    layout, layers = find_layers(model)
    sites = attention_sites(model, layers)
    # One attention block per layer (every encoder-only and decoder-only model): blocks are layers.
    single = len(sites) == len(layers) and len(layers.stacks) == 1
    where = "layer" if len(sites) == len(layers) else "attention block"
    requests = normalize_units(heads, len(sites), "heads", where)
    native: dict[int, list[int]] = {}
    own: dict[int, list[int]] = {}
    for index, requested in sorted(requests.items()):
        site = sites[index]
        if site.spec.shared_position_bias and not set(kept_heads_of(site.spec, site.layer)) - requested:
            raise ValueError(
                f"hf_prune: {where} {index} of {type(model).__name__} would lose every head; its position bias is "
                "handed on to the next layers, so at least one head stays."
            )
        _check_head_request(site.spec, index, site.layer, requested, where)
        new = requested - pruned_heads_of(site.spec, site.layer)
        if not new:
            continue
        remaining = [h for h in kept_heads_of(site.spec, site.layer) if h not in new]
        if remaining and single and native_prune_heads_available(model, site.layout):
            native[index] = sorted(new)
        else:
            own[index] = sorted(new)

    if native:
        _prune_heads_native(model, layout, sites, native)
    for index, new in own.items():
        site = sites[index]
        spec, layer = site.spec, site.layer
        kept = kept_heads_of(spec, layer)
        pruned = pruned_heads_of(spec, layer) | set(new)
        keep_positions = [pos for pos, h in enumerate(kept) if h not in pruned]
        if keep_positions:
            _remove_heads_own(spec, layer, keep_positions, [kept[pos] for pos in keep_positions])
            get_module(layer, spec.owner).pruned_heads = pruned
        else:
            _empty_attention(spec, site.layout, layer, pruned)
    if native or own:
        sync_config_pruned_heads(model, layout, layers)
        record_structure(model)
        logger.info("hf_prune: removed heads %s", dict(sorted({**native, **own}.items())))
    return model


def _prune_heads_native(
    model: nn.Module, layout: Layout, sites: list[AttentionSite], heads: dict[int, list[int]]
) -> None:
    """Transformers 4.x's own `prune_heads`, then restore what it does not preserve (dtype, requires_grad)."""
    before = {}
    for index in heads:
        site = sites[index]
        for path in site.spec.projections():
            module = get_module(site.layer, path)
            check_plain(module, path)
            flags = {name: p.requires_grad for name, p in module.named_parameters(recurse=False)}
            before[index, path] = (module.weight.dtype, flags)
    model.prune_heads({sites[index].layer_idx: h for index, h in heads.items()})
    for (index, path), (dtype, flags) in before.items():
        module = get_module(sites[index].layer, path)
        # Transformers' prune_linear_layer builds a float32 layer whatever the model's dtype.
        module.to(dtype=dtype)
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(flags.get(name, True))


# ----------------------------------------------------------------------------------------------------------------
# FFN neurons
# ----------------------------------------------------------------------------------------------------------------


def fused_rows(width: int, positions: list[int]) -> torch.Tensor:
    """Rows of a fused [activated half | linear half] projection of `width` neurons holding `positions`."""
    index = torch.tensor(positions, dtype=torch.long)
    return torch.cat([index, index + width])


@torch.no_grad()
def prune_ffn_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove FFN (MLP) neurons physically, in place; returns `model`.

    Args:
        model: a Transformers model of a registered layout (`hf_prune.structure.registered_layouts()`).
        neurons: layer index -> neuron indices (rows of the up projection, columns of the down projection) in the
            layer's ORIGINAL numbering. Already removed neurons are ignored, so calls compose. Gated MLPs lose the
            same rows of `gate_proj` and `up_proj` (or of both halves of a fused `gate_up_proj`) and columns of
            `down_proj`. A layer may lose all neurons: its MLP then adds the down-projection bias only.

    The intermediate size then differs per layer, which no Transformers config can express: reload with
    `load_pruned` (the structure is recorded in the config).
    """
    _, layers = find_layers(model)
    requests = normalize_units(neurons, len(layers), "neurons")
    changed = {}
    for layer_idx, requested in sorted(requests.items()):
        layer = layers[layer_idx]
        if layers.layout(layer_idx).moe is not None:
            count = prune_moe_neurons(layers.layout(layer_idx), layer, layer_idx, requested)
            if count:
                changed[layer_idx] = count
            continue
        mlp = layers.layout(layer_idx).require_mlp()
        pruned = pruned_neurons_of(mlp, layer)
        kept = kept_neurons_of(mlp, layer)
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
            for path in mlp.inputs:
                keep_outputs(get_module(layer, path), index, path)
            if mlp.fused:
                keep_outputs(get_module(layer, mlp.fused), fused_rows(len(kept), keep_positions), mlp.fused)
            keep_inputs(get_module(layer, mlp.output), index, mlp.output)
        else:
            for path in (*mlp.inputs, mlp.fused):
                if not path:
                    continue
                module = get_module(layer, path)
                check_plain(module, path)
                set_module(layer, path, ZeroWidth(in_width_of(module)))
            output = get_module(layer, mlp.output)
            check_plain(output, mlp.output)
            set_module(layer, mlp.output, BiasOnly(_output_bias(output), out_width_of(output)))
        owner = get_module(layer, mlp.owner)
        setattr(owner, NEURONS_ATTR, pruned)
        if isinstance(getattr(owner, "intermediate_size", None), int):
            owner.intermediate_size = len(keep_positions)
        changed[layer_idx] = len(new)
    if changed:
        record_structure(model)
        logger.info("hf_prune: removed FFN neurons per layer %s", changed)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Structures whose contribution is exactly zero
# ----------------------------------------------------------------------------------------------------------------
