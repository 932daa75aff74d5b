"""What a model looks like after structural pruning, for logs, model cards and the saved structure record."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

from .layout import (
    attention_sites,
    find_layers,
    group_size_of,
    head_dim_of,
    hidden_size_of,
    kept_experts_of,
    kept_heads_of,
    kept_neurons_of,
    moe_kept_neurons,
    moe_neuron_total,
    moe_pruned_neurons,
    native_prune_heads_available,
    pruned_experts_of,
    pruned_heads_of,
    pruned_hidden_of,
    pruned_layers_of,
    pruned_neurons_of,
    stack_layer_field,
)
from .standins import ExactLayerNorm, ExactRMSNorm

# ----------------------------------------------------------------------------------------------------------------


def structure_summary(model: nn.Module) -> dict:
    """The model's structure after pruning, for logs, model cards and `hf_prune_structure.json`.

    Returns:
        {"architecture", "num_layers", "num_attention_heads" (original, per layer), "heads_per_layer",
        "pruned_heads" {layer: [original indices]}, "key_value_heads_per_layer", "head_group_size",
        "intermediate_size" (original), "intermediate_sizes", "pruned_neurons" {layer: [original indices]},
        "original_num_layers", "pruned_layers" [original layer indices], "hidden_size", "original_hidden_size",
        "pruned_hidden" [original channel indices], "norm_elements" (the element count of the exact-statistics
        norms, None with plain norms), "head_dim", "parameters", "loads_with_from_pretrained"}.
        Per-layer keys and lists follow the CURRENT layer list (what `prune_heads` indexes); the structure record
        in the config re-keys them to original layer indices.
    """
    layout, layers = find_layers(model)
    sites = attention_sites(model, layers)
    heads_per_layer, kv_per_layer, pruned_heads, sizes, pruned_neurons = [], [], {}, [], {}
    original_heads = original_size = 0
    for site in sites:
        spec, layer = site.spec, site.layer
        kept = kept_heads_of(spec, layer)
        group = group_size_of(spec, layer)
        heads_per_layer.append(len(kept))
        kv_per_layer.append(len({h // group for h in kept}))
        original_heads = max(original_heads, len(kept) + len(pruned_heads_of(spec, layer)))
        if pruned_heads_of(spec, layer):
            pruned_heads[site.index] = sorted(pruned_heads_of(spec, layer))
    experts_per_layer, pruned_experts = [], {}
    for i, layer in enumerate(layers):
        moe = layers.layout(i).moe
        if moe is not None:
            kept = moe_kept_neurons(moe, layer)
            sizes.append(len(kept))
            original_size = max(original_size, moe_neuron_total(moe, layer))
            if moe_pruned_neurons(moe, layer):
                pruned_neurons[i] = sorted(moe_pruned_neurons(moe, layer))
            experts_per_layer.append(len(kept_experts_of(moe, layer)))
            if pruned_experts_of(moe, layer):
                pruned_experts[i] = sorted(pruned_experts_of(moe, layer))
        mlp = layers.layout(i).mlp
        if mlp is None:
            continue
        kept_neurons = kept_neurons_of(mlp, layer)
        sizes.append(len(kept_neurons))
        original_size = max(original_size, len(kept_neurons) + len(pruned_neurons_of(mlp, layer)))
        if pruned_neurons_of(mlp, layer):
            pruned_neurons[i] = sorted(pruned_neurons_of(mlp, layer))
    pruned_hidden = sorted(pruned_hidden_of(model))
    hidden = hidden_size_of(layout, layers)
    norm_elements = next(
        (m.elements for m in model.modules() if isinstance(m, (ExactLayerNorm, ExactRMSNorm))), None
    )
    loads_plainly = not pruned_neurons and not pruned_hidden and not pruned_experts and (
        not pruned_heads
        or (native_prune_heads_available(model, layout) and all(heads_per_layer) and _config_matches(model, pruned_heads))
    )
    return {
        "architecture": layers.name,
        "num_layers": len(layers),
        "num_attention_heads": original_heads,
        "heads_per_layer": heads_per_layer,
        "pruned_heads": pruned_heads,
        "key_value_heads_per_layer": kv_per_layer,
        "head_group_size": max((group_size_of(s.spec, s.layer) for s in sites), default=1),
        "intermediate_size": original_size,
        "intermediate_sizes": sizes,
        "pruned_neurons": pruned_neurons,
        "experts_per_layer": experts_per_layer,
        "pruned_experts": pruned_experts,
        "original_num_layers": len(layers) + len(pruned_layers_of(layers)),
        "original_stack_layers": {} if len(layers.stacks) == 1 else {
            stack_layer_field(model.config, stack): len(stack.layers) + len(pruned_layers_of(stack.layers))
            for stack in layers.stacks
        },
        "pruned_layers": sorted(pruned_layers_of(layers)),
        "hidden_size": hidden,
        "original_hidden_size": hidden + len(pruned_hidden),
        "pruned_hidden": pruned_hidden,
        "norm_elements": norm_elements,
        "head_dim": head_dim_of(sites[0].spec, sites[0].layer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loads_with_from_pretrained": bool(loads_plainly),
    }


def _config_matches(model: nn.Module, pruned_heads: dict[int, list[int]]) -> bool:
    recorded = int_keys(getattr(model.config, "pruned_heads", None) or {})
    return {k: sorted(set(v)) for k, v in recorded.items() if v} == pruned_heads


def int_keys(mapping: Mapping[Any, Iterable[int]]) -> dict[int, list[int]]:
    return {int(k): sorted({int(i) for i in v}) for k, v in mapping.items()}

