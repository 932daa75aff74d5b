"""Heads and FFN neurons whose contribution is exactly zero, found and removed (what block or row/column movement
pruning leaves behind; nn_pruning's `optimize_model`)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..linear import matrix_view
from .layout import (
    attention_sites,
    find_layers,
    group_size_of,
    head_dim_of,
    kept_heads_of,
    kept_neurons_of,
    num_kv_heads_of,
    qkv_rows,
)
from .paths import get_module
from .removal import prune_ffn_neurons, prune_heads
from .slots import moe_neuron_slot
from .spec import AttentionLayout, MlpLayout, MoeLayout

def _all_zero(tensor: Optional[torch.Tensor]) -> bool:
    return tensor is None or not bool(tensor.any())


def _value_rows(spec: AttentionLayout, layer: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    """The projection holding the values and, per current key/value head, its rows there."""
    head_dim = head_dim_of(spec, layer)
    kv = num_kv_heads_of(spec, layer)
    if spec.qkv:
        return get_module(layer, spec.qkv), [qkv_rows(spec, layer, "v", [j]) for j in range(kv)]
    return get_module(layer, spec.value), [torch.arange(j * head_dim, (j + 1) * head_dim) for j in range(kv)]


def _empty_heads(spec: AttentionLayout, layer: nn.Module) -> list[int]:
    """Original indices of heads (whole groups under GQA) whose contribution to the layer output is exactly zero.

    A head contributes nothing when its columns of the output projection are all zero, or when its value rows and
    value bias are all zero (its context is then zero whatever the attention pattern). Zero queries or keys do not
    qualify: they make the attention uniform, not absent.
    """
    kept = kept_heads_of(spec, layer)
    if not kept:
        return []
    head_dim = head_dim_of(spec, layer)
    out_w = matrix_view(get_module(layer, spec.output)).detach()
    v_module, v_rows = _value_rows(spec, layer)
    v_w = matrix_view(v_module).detach()
    v_b = v_module.bias.detach() if getattr(v_module, "bias", None) is not None else None
    group = group_size_of(spec, layer)

    def value_zero(unit: int) -> bool:
        rows = v_rows[unit].to(v_w.device)
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


def _empty_neurons(mlp: MlpLayout, layer: nn.Module) -> list[int]:
    """Original indices of FFN neurons whose contribution is exactly zero.

    A neuron contributes nothing when its down-projection column is zero; or when its input row and bias are zero
    and the activation maps 0 to 0 (ReLU, GELU, SiLU); in a gated MLP also when its up-projection row and bias are
    zero (the product is then zero whatever the gate).
    """
    kept = kept_neurons_of(mlp, layer)
    if not kept:
        return []
    down = matrix_view(get_module(layer, mlp.output)).detach()
    zero = ~down.any(dim=0)

    def input_zero(path: str) -> torch.Tensor:
        module = get_module(layer, path)
        rows_zero = ~matrix_view(module).detach().any(dim=1)
        if getattr(module, "bias", None) is not None:
            rows_zero &= module.bias.detach() == 0
        return rows_zero

    act_zero = _activation_is_zero_at_zero(get_module(layer, mlp.activation))
    if mlp.fused:
        both = input_zero(mlp.fused)
        activated, linear = both[: len(kept)], both[len(kept):]
    else:
        activated = input_zero(mlp.inputs[0])
        linear = input_zero(mlp.inputs[1]) if mlp.gated else None
    if linear is not None:
        zero |= linear
    if act_zero:
        zero |= activated
    return [kept[pos] for pos in torch.nonzero(zero).flatten().tolist()]


def _empty_moe_neurons(moe: MoeLayout, layer: nn.Module, layer_idx: int) -> list[int]:
    """Neurons of a mixture-of-experts layer whose down-projection column is zero, in the layer's numbering.

    Experts stored as one tensor (Transformers 5) keep equal widths in 16-byte rows: each routed expert then loses
    the same number of its empty neurons, the largest such multiple all of them have.
    """
    slot = moe_neuron_slot(moe, layer, layer_idx)
    found = []
    for piece in slot.pieces():
        matrix = matrix_view(piece.module, piece.matrix_of(piece.leaf)).detach()
        found.append((piece, [piece.kept[pos] for pos in torch.nonzero(~matrix.any(dim=0)).flatten().tolist()]))
    routed = [(piece, empty) for piece, empty in found if piece.expert is not None]
    if routed:
        multiple = 16 // math.gcd(16, routed[0][0].leaf.element_size())
        count = min(len(empty) for _, empty in routed) // multiple * multiple
        if count == len(routed[0][0].kept):
            count -= multiple  # every expert keeps at least one row of neurons
        found = [(piece, empty[: max(count, 0)] if piece.expert is not None else empty) for piece, empty in found]
    return sorted(n for _, empty in found for n in empty)


@torch.no_grad()
def remove_empty_structures(model: nn.Module) -> dict[str, dict[int, list[int]]]:
    """Find heads and FFN neurons whose contribution is exactly zero and remove them physically, in place.

    What block or row/column movement pruning leaves behind (nn_pruning's `optimize_model`): the outputs are
    unchanged up to float rounding, the matrices smaller. Only exact zeros count.

    Returns:
        {"heads": {attention block: [original head indices removed]}, "neurons": {layer: [original neuron indices removed]}},
        listing only layers where something was removed.
    """
    _, layers = find_layers(model)
    heads = {site.index: _empty_heads(site.spec, site.layer) for site in attention_sites(model, layers)}
    neurons = {
        i: _empty_neurons(layers.layout(i).mlp, layer) if layers.layout(i).moe is None else
        _empty_moe_neurons(layers.layout(i).moe, layer, i)
        for i, layer in enumerate(layers) if layers.layout(i).mlp or layers.layout(i).moe
    }
    heads = {i: h for i, h in heads.items() if h}
    neurons = {i: n for i, n in neurons.items() if n}
    if heads:
        prune_heads(model, heads)
    if neurons:
        prune_ffn_neurons(model, neurons)
    return {"heads": heads, "neurons": neurons}


# ----------------------------------------------------------------------------------------------------------------
# Summary, saving, loading
