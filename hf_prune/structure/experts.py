"""Mixture-of-experts blocks: whole experts (with the router's rows) and FFN neurons inside experts, removed in place.

Mixtral, Qwen2-MoE and their relatives route each token to `top_k` of a layer's experts. Removing an expert removes
its router row, so the router's softmax and top-k run over the experts left: the model computes what the original
computes with that expert's router logit at minus infinity. Neurons inside an expert are removed like the neurons of
a dense MLP and are exact when they contributed nothing.

Storage differs by Transformers major: 4.x keeps the experts as an `nn.ModuleList` of MLPs (each may keep its own
number of neurons); 5.x keeps them as 3D tensors `(experts, 2 * size, hidden)` and `(experts, hidden, size)`, so there
every expert of a layer must keep the same number of neurons.

Numbering is ORIGINAL throughout, as for heads: experts by their index in the unpruned layer, neurons as
`expert * original_expert_size + neuron` for routed experts, then the shared expert's neurons.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from transformers.utils import logging

from .layout import (
    EXPERTS_ATTR,
    EXPERT_SIZE_ATTR,
    NEURONS_ATTR,
    expert_size,
    experts_are_fused,
    find_layers,
    kept_experts_of,
    moe_kept_neurons,
    moe_neuron_total,
    moe_pruned_neurons,
    normalize_units,
    num_experts_of,
    pruned_experts_of,
    shared_expert_total,
)
from .paths import get_module
from .record import record_structure
from .slicing import in_width_of, keep_inputs, keep_outputs, out_width_of, replace_parameter
from .spec import Layout, MoeLayout

logger = logging.get_logger(__name__)

def moe_of(layout: Layout) -> MoeLayout:
    if layout.moe is None:
        raise ValueError(f"hf_prune: the {layout.name!r} layout ({layout.families}) has no mixture-of-experts block.")
    return layout.moe


def _set_counts(moe: MoeLayout, layer: nn.Module, value: int) -> None:
    for path in (moe.block, moe.router, moe.experts):
        module = get_module(layer, path)
        for attr in moe.count_attrs:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, value)


@torch.no_grad()
def prune_experts(model: nn.Module, experts: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove whole experts of mixture-of-experts layers physically, in place; returns `model`.

    Args:
        model: a Transformers model whose layers have a registered MoE block (Mixtral, Qwen2-MoE, ...).
        experts: layer index -> expert indices to remove, in the layer's ORIGINAL numbering. Already removed experts
            are ignored, so calls compose. At least `top_k` experts (`num_experts_per_tok`) must stay in a layer.

    The router loses the experts' rows, so tokens are routed among the experts left exactly as the original model
    routes them when those experts' logits are minus infinity. Reload with `load_pruned`.
    """
    _, layers = find_layers(model)
    requests = normalize_units(experts, len(layers), "experts")
    changed = {}
    for layer_idx, requested in sorted(requests.items()):
        layer = layers[layer_idx]
        moe = moe_of(layers.layout(layer_idx))
        kept = kept_experts_of(moe, layer)
        total = len(kept) + len(pruned_experts_of(moe, layer))
        bad = sorted(e for e in requested if not 0 <= e < total)
        if bad:
            raise ValueError(f"hf_prune: layer {layer_idx} has experts 0 to {total - 1} (original numbering); "
                             f"cannot prune {bad}.")
        new = requested - pruned_experts_of(moe, layer)
        if not new:
            continue
        positions = [pos for pos, e in enumerate(kept) if e not in new]
        block = get_module(layer, moe.block)
        top_k = getattr(block, "top_k", None) or getattr(get_module(layer, moe.router), "top_k", None)
        if isinstance(top_k, int) and len(positions) < top_k:
            raise ValueError(
                f"hf_prune: layer {layer_idx} routes every token to top_k={top_k} experts; removing {sorted(new)} "
                f"would leave {len(positions)} of {total}."
            )
        if getattr(block, EXPERT_SIZE_ATTR, None) is None:
            setattr(block, EXPERT_SIZE_ATTR, expert_size(moe, layer))
        index = torch.tensor(positions, dtype=torch.long)
        router = get_module(layer, moe.router)
        if isinstance(router, nn.Linear):
            keep_outputs(router, index, moe.router)
        else:
            replace_parameter(router, "weight", router.weight.index_select(0, index.to(router.weight.device)))
        module = get_module(layer, moe.experts)
        if experts_are_fused(moe, layer):
            for name in (moe.fused_gate_up, moe.fused_down):
                param = getattr(module, name)
                replace_parameter(module, name, param.index_select(0, index.to(param.device)))
        else:
            for pos in sorted(set(range(len(kept))) - set(positions), reverse=True):
                del module[pos]
        _set_counts(moe, layer, len(positions))
        setattr(block, EXPERTS_ATTR, pruned_experts_of(moe, layer) | new)
        changed[layer_idx] = sorted(new)
    if changed:
        record_structure(model)
        logger.info("hf_prune: removed experts %s", changed)
    return model


def _slice_fused_experts(moe: MoeLayout, layer: nn.Module, keep: list[list[int]], layer_idx: int) -> None:
    counts = {len(k) for k in keep}
    if len(counts) > 1 or counts == {0}:
        per_expert = {e: len(k) for e, k in zip(kept_experts_of(moe, layer), keep)}
        raise ValueError(
            f"hf_prune: layer {layer_idx} stores its experts as one tensor (Transformers 5), so every expert must keep "
            f"the same number of neurons, at least one; this request would keep {per_expert}. Remove the same number "
            "of neurons from each expert, or whole experts with prune_experts."
        )
    module = get_module(layer, moe.experts)
    gate_up, down = getattr(module, moe.fused_gate_up), getattr(module, moe.fused_down)
    width = down.shape[2]
    left = counts.pop()
    if (left * down.element_size()) % 16:
        # torch's grouped matrix product, which Transformers 5 runs the experts with, wants 16-byte rows.
        multiple = 16 // math.gcd(16, down.element_size())
        raise ValueError(
            f"hf_prune: layer {layer_idx} would keep {left} neurons per expert; Transformers 5 runs experts with "
            f"torch's grouped matrix product, which needs rows of a multiple of 16 bytes: keep a multiple of "
            f"{multiple} neurons per expert in {down.dtype}."
        )
    device = down.device
    rows = torch.stack([torch.tensor(k + [width + n for n in k], dtype=torch.long) for k in keep]).to(device)
    cols = torch.stack([torch.tensor(k, dtype=torch.long) for k in keep]).to(device)
    new_gate_up = torch.gather(gate_up, 1, rows[:, :, None].expand(-1, -1, gate_up.shape[2]))
    new_down = torch.gather(down, 2, cols[:, None, :].expand(-1, down.shape[1], -1))
    replace_parameter(module, moe.fused_gate_up, new_gate_up)
    replace_parameter(module, moe.fused_down, new_down)
    for attr in moe.size_attrs:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, int(cols.shape[1]))


def _slice_mlp(mlp: Any, root: nn.Module, keep: list[int], total: int) -> None:
    """Keep neurons at current positions `keep` of a dense MLP (of `total` present) below `root`."""
    from .removal import fused_rows  # the dense MLP's helpers; removal imports nothing from here
    from .slicing import check_plain
    from .standins import BiasOnly, ZeroWidth
    from .paths import set_module

    if keep:
        index = torch.tensor(keep, dtype=torch.long)
        for path in mlp.inputs:
            keep_outputs(get_module(root, path), index, path)
        if mlp.fused:
            keep_outputs(get_module(root, mlp.fused), fused_rows(total, keep), mlp.fused)
        keep_inputs(get_module(root, mlp.output), index, mlp.output)
        return
    for path in (*mlp.inputs, mlp.fused):
        if path:
            module = get_module(root, path)
            check_plain(module, path)
            set_module(root, path, ZeroWidth(in_width_of(module)))
    output = get_module(root, mlp.output)
    check_plain(output, mlp.output)
    set_module(root, mlp.output, BiasOnly(getattr(output, "bias", None), out_width_of(output)))


def prune_moe_neurons(layout: Layout, layer: nn.Module, layer_idx: int, requested: set[int]) -> int:
    """Remove FFN neurons (ORIGINAL ids, see the module docstring) of one MoE layer; returns how many were new."""
    moe = moe_of(layout)
    total = moe_neuron_total(moe, layer)
    bad = sorted(n for n in requested if not 0 <= n < total)
    if bad:
        raise ValueError(
            f"hf_prune: layer {layer_idx} has FFN neurons 0 to {total - 1} (original numbering: expert * "
            f"{expert_size(moe, layer)} + neuron, then the shared expert's); cannot prune {bad[:10]}."
        )
    kept_ids = set(moe_kept_neurons(moe, layer))
    new = (requested & kept_ids) - moe_pruned_neurons(moe, layer)
    if not new:
        return 0
    block = get_module(layer, moe.block)
    if getattr(block, EXPERT_SIZE_ATTR, None) is None:
        setattr(block, EXPERT_SIZE_ATTR, expert_size(moe, layer))
    size = expert_size(moe, layer)
    pruned = moe_pruned_neurons(moe, layer) | new
    experts_total = num_experts_of(moe, layer) + len(pruned_experts_of(moe, layer))
    keep = []
    for e in kept_experts_of(moe, layer):
        present = [n for n in range(size) if e * size + n not in moe_pruned_neurons(moe, layer)]
        keep.append([pos for pos, n in enumerate(present) if e * size + n not in pruned])
    if any(e * size + n in new for e in range(experts_total) for n in range(size)):
        if experts_are_fused(moe, layer):
            _slice_fused_experts(moe, layer, keep, layer_idx)
        else:
            for expert, positions in zip(get_module(layer, moe.experts), keep):
                _slice_mlp(moe.expert_mlp, expert, positions, in_width_of(get_module(expert, moe.expert_mlp.output)))
    offset = experts_total * size
    shared_new = {n - offset for n in new if n >= offset}
    if shared_new:
        already = {n - offset for n in moe_pruned_neurons(moe, layer) if n >= offset}
        present = [n for n in range(shared_expert_total(moe, layer)) if n not in already]
        positions = [pos for pos, n in enumerate(present) if n not in shared_new]
        _slice_mlp(moe.shared, layer, positions, len(present))
        owner = get_module(layer, moe.shared.owner)
        setattr(owner, NEURONS_ATTR, already | shared_new)
        if isinstance(getattr(owner, "intermediate_size", None), int):
            owner.intermediate_size = len(positions)
    setattr(block, NEURONS_ATTR, pruned)
    return len(new)
