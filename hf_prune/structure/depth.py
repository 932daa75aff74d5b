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

from .layout import LAYERS_ATTR, find_layers, get_module, module_path, pruned_layers_of
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


@torch.no_grad()
def prune_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Remove whole transformer layers physically, in place; returns `model`.

    Args:
        model: a BERT-style, DistilBERT, GPT-2 or Llama-style Transformers model, pruned in other ways or not.
        layers: layer indices in the ORIGINAL numbering (0 to the unpruned number of layers - 1). Layers already
            removed are ignored, so calls compose; at least one layer must stay.

    `config.num_hidden_layers` (`n_layer`, `n_layers`) and per-layer config lists (`layer_types`) follow; every
    `layer_idx` the remaining layers hold is renumbered, so GPT-2 and Llama key/value caches index the layers
    present and `generate` works; `config.pruned_heads` is re-keyed to the new positions. A model with only layers
    removed reloads with plain `from_pretrained`; with anything else removed too, with `load_pruned`.
    """
    layers = list(layers)
    if not layers:
        return model  # nothing to remove (load_pruned calls this for every model)
    layout, view = find_layers(model)
    if len(view.stacks) != 1:
        raise ValueError(
            f"hf_prune.prune_layers: {type(model).__name__} has {len(view.stacks)} stacks of layers (encoder and "
            "decoder); removing whole layers is supported for single-stack models (encoders, decoders) only."
        )
    layer_list = view.stacks[0].layers
    pruned = pruned_layers_of(layer_list)
    original = len(layer_list) + len(pruned)
    requested = _check_layers(layers, original)
    kept = [i for i in range(original) if i not in pruned]
    new = requested - pruned
    if not new:
        return model
    positions = [pos for pos, i in enumerate(kept) if i not in new]
    if not positions:
        raise ValueError(
            f"hf_prune.prune_layers: layers= would remove all {len(kept)} layers left (of {original}); at least one "
            "must stay."
        )
    _check_layer_index_free(model)
    before = len(layer_list)
    config = getattr(model, "config", None)
    changes: dict = {}
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == before:
        changes["layer_types"] = [layer_types[pos] for pos in positions]
    changes["num_hidden_layers"] = len(positions)
    check_config_change(config, changes, "prune_layers")
    for pos in sorted(set(range(before)) - set(positions), reverse=True):
        del layer_list[pos]  # ModuleList renumbers its keys, so parameter names stay contiguous
    for new_idx, layer in enumerate(layer_list):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    setattr(layer_list, LAYERS_ATTR, pruned | new)

    path = module_path(model, layer_list)
    parent = get_module(model, path.rpartition(".")[0]) if "." in path else model
    if isinstance(getattr(parent, "n_layers", None), int):  # DistilBERT's Transformer
        parent.n_layers = len(layer_list)
    if config is not None:
        for key, value in changes.items():
            setattr(config, key, value)
    sync_config_pruned_heads(model, layout, layer_list)
    record_structure(model)
    logger.info("hf_prune: removed layers %s (original numbering), %d left", sorted(new), len(layer_list))
    return model
