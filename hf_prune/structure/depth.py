"""Depth pruning: whole transformer layers removed physically, in place, in the ORIGINAL numbering.

Minitron (Muralidharan et al. 2024) and ShortGPT (Men et al. 2024) show that many layers of a trained transformer
change its hidden states little and can be dropped, then recovered by distillation. Removing a layer here is exactly
skipping it: the layers before and after are untouched, so the model computes what the original computes with that
block replaced by the identity.

Numbering. Layers are named by their ORIGINAL index, so repeated calls compose (naming a removed layer again is a
no-op) and the structure record lists them as in the checkpoint. Heads and FFN neurons stay attached to their layer:
they travel with it or go with it. `prune_heads` / `prune_ffn_neurons` and the importance tensors keep indexing the
CURRENT layer list, as Transformers' own `prune_heads` and `config.pruned_heads` do; `original_layer_indices(model)`
maps positions to original indices, and the saved record uses original indices throughout.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from transformers.utils import logging

from .layout import LAYERS_ATTR, find_layers, pruned_layers_of, stack_layer_field
from .paths import get_module
from .record import check_config_change, record_structure
from .removal import sync_config_pruned_heads
from .standins import TRANSFORMERS_MAJOR

logger = logging.get_logger(__name__)


def _check_layers(layers: Iterable[int], original: int) -> set[int]:
    requested = {int(i) for i in layers}
    bad = sorted(i for i in requested if not 0 <= i < original)
    if bad:
        raise ValueError(
            f"hf_prune.prune_layers: layers={bad} do not exist; the model has layers 0 to {original - 1} (original "
            "numbering)."
        )
    return requested


def _check_layer_index_free(model: nn.Module) -> None:
    """GPT-2 under Transformers 4.x can divide its attention scores by the layer's index at every forward: renumbering
    the remaining layers (which their key/value cache needs) would change their outputs."""
    config = getattr(model, "config", None)
    if TRANSFORMERS_MAJOR < 5 and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "hf_prune.prune_layers: config.scale_attn_by_inverse_layer_idx=True scales each layer's attention by its "
            "index under Transformers 4.x, so removing layers would change the layers after them; only False is "
            "supported (or use Transformers 5, which fixes the scale when the model is built)."
        )


def _check_no_shared_bias(stack_path: str, layer: nn.Module, index: int) -> None:
    """T5's first layer computes the relative position bias every later layer of its stack reuses."""
    if any(getattr(m, "has_relative_attention_bias", False) for m in layer.modules()):
        raise ValueError(
            f"hf_prune.prune_layers: layer {index} ({stack_path}) computes the relative position bias that every later "
            "layer of its stack reuses; it cannot be removed (remove later layers instead)."
        )


@torch.no_grad()
def prune_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Remove whole transformer layers physically, in place; returns `model`.

    Args:
        model: a Transformers model of a registered layout, pruned in other ways or not.
        layers: layer indices in the ORIGINAL numbering (0 to the unpruned number of layers - 1; in encoder-decoder
            models the decoder's layers follow the encoder's). Layers already removed are ignored, so calls
            compose; at least one layer must stay in each stack.

    `config.num_hidden_layers` (`n_layer`, `n_layers`; `encoder_layers` / `decoder_layers`, T5's `num_layers` /
    `num_decoder_layers` per stack) and per-layer config lists (`layer_types`) follow; every `layer_idx` the
    remaining layers hold is renumbered, so key/value caches index the layers present and `generate` works;
    `config.pruned_heads` is re-keyed to the new positions. A model with only layers removed reloads with plain
    `from_pretrained`; with anything else removed too, with `load_pruned`.
    """
    layers = list(layers)
    if not layers:
        return model  # nothing to remove (load_pruned calls this for every model)
    layout, view = find_layers(model)
    pruned = pruned_layers_of(view)
    original = len(view) + len(pruned)
    requested = _check_layers(layers, original)
    new = requested - pruned
    if not new:
        return model
    _check_layer_index_free(model)
    config = getattr(model, "config", None)
    single = len(view.stacks) == 1
    plans = []  # (stack, positions to keep, local original indices removed after this call)
    changes: dict = {}
    offset = 0
    for stack in view.stacks:
        local_pruned = pruned_layers_of(stack.layers)
        count = len(stack.layers) + len(local_pruned)
        local_new = {i - offset for i in new if offset <= i < offset + count}
        kept = [i for i in range(count) if i not in local_pruned]
        positions = [pos for pos, i in enumerate(kept) if i not in local_new]
        offset += count
        if not local_new:
            continue
        if not positions:
            where = "" if single else f" of {stack.path!r}"
            raise ValueError(
                f"hf_prune.prune_layers: layers= would remove all {len(kept)} layers left (of {count}){where}; at "
                "least one must stay."
            )
        for pos, i in enumerate(kept):
            if i in local_new:
                _check_no_shared_bias(stack.path, stack.layers[pos], offset - count + i)
        field = "num_hidden_layers" if single else stack_layer_field(config, stack)
        layer_types = getattr(config, "layer_types", None)
        if single and isinstance(layer_types, (list, tuple)) and len(layer_types) == len(stack.layers):
            changes["layer_types"] = [layer_types[pos] for pos in positions]
        changes[field] = len(positions)
        plans.append((stack, positions, local_pruned | local_new))
    check_config_change(config, changes, "prune_layers")
    for stack, positions, removed in plans:
        layer_list = stack.layers
        for pos in sorted(set(range(len(layer_list))) - set(positions), reverse=True):
            del layer_list[pos]  # ModuleList renumbers its keys, so parameter names stay contiguous
        for new_idx, layer in enumerate(layer_list):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_idx
        setattr(layer_list, LAYERS_ATTR, removed)
        parent = get_module(model, stack.path.rpartition(".")[0]) if "." in stack.path else model
        if isinstance(getattr(parent, "n_layers", None), int):  # DistilBERT's Transformer
            parent.n_layers = len(layer_list)
    if config is not None:
        for key, value in changes.items():
            setattr(config, key, value)
    view.refresh()
    if single:
        sync_config_pruned_heads(model, layout, view.stacks[0].layers)
    record_structure(model)
    logger.info("hf_prune: removed layers %s (original numbering), %d left", sorted(new), len(view))
    return model
