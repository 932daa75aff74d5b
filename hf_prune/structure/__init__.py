"""Structural pruning: attention heads, FFN neurons, whole layers (depth) and hidden channels (width) removed
physically, and the smaller models saved and reloaded.

Unstructured zeros save nothing at inference; removing whole heads, FFN neurons, layers and hidden channels shrinks
the model itself, so it is smaller and faster in PyTorch and in ONNX Runtime alike.

Numbering. Heads and neurons are always named by their index in the ORIGINAL, unpruned layer, as Transformers'
`prune_heads` and `config.pruned_heads` do, so repeated calls compose: pruning head 3 of a layer that already lost
head 1 removes the head that was number 3 in the checkpoint, and naming an already removed head again is a no-op.
Layers (`prune_layers`) and hidden channels (`prune_hidden`) are named by their original index the same way. The
layer keys of `prune_heads` / `prune_ffn_neurons` are positions in the CURRENT layer list (as Transformers'); they
equal the original indices until layers are removed, `original_layer_indices` maps them, and the structure record
saved in the config keys everything by original index.

Architectures: every family with a registered `Layout` (`layouts.py`: BERT-style, DeBERTa, ModernBERT, MPNet,
DistilBERT, ViT, GPT-2, Llama-style, Gemma, Phi-3, GPT-NeoX, Falcon, BART-style encoder-decoders and OPT, wav2vec2,
mixture-of-experts attention), under Transformers 4.x and 5.x; `register_layout` adds one.

Modules, one job each:
    paths     modules by dotted path
    spec      how a family is described (Layout and its parts) and the registry
    layouts   the built-in family table
    layout    the layer view every module reads: stacks, attention blocks, heads, neurons, experts
    slicing   slicing one Linear / Conv1D in place
    standins  what replaces an attention or MLP block that lost all its heads or neurons; exact-statistics norms
    removal   `prune_heads`, `prune_ffn_neurons`
    depth     `prune_layers`
    experts   `prune_experts`, neurons inside experts (mixture-of-experts layers)
    head_inputs  per-head tensors computed outside a block (MPNet's and T5's relative position bias)
    width     `prune_hidden`, `zero_hidden_channels`, where the residual stream is read and written
    empty     `remove_empty_structures` (heads and neurons that are exactly zero)
    summary   `structure_summary`
    record    the structure record in `config.json`
    io        `save_structure`, `save_pruned`, `load_pruned`
"""

from .depth import prune_layers
from .empty import remove_empty_structures
from .experts import prune_experts
from .io import STRUCTURE_NAME, load_pruned, save_pruned, save_structure
from .layout import (
    NEURONS_ATTR,
    AttentionSite,
    LayerView,
    attention_sites,
    find_layers,
    head_group_size,
    original_layer_indices,
)
from .record import CONFIG_ATTR, STRUCTURE_FORMAT_VERSION, record_structure
from .removal import prune_ffn_neurons, prune_heads
from .slots import ExpertProjection, UnitSlot, expert_probes, head_slots, neuron_slots
from .spec import (
    AttentionLayout,
    HiddenLayout,
    Layout,
    MlpLayout,
    register_layout,
    registered_layouts,
    unregister_layout,
)
from .standins import BiasOnly, EmptyAttention, ExactLayerNorm, ExactRMSNorm, NoHeadsSelfAttention, ZeroWidth
from .summary import structure_summary
from .width import (
    hidden_channel_parameters,
    hidden_norms,
    hidden_positions,
    prune_hidden,
    zero_hidden_channels,
)

__all__ = [
    "AttentionLayout",
    "AttentionSite",
    "HiddenLayout",
    "LayerView",
    "MlpLayout",
    "attention_sites",
    "register_layout",
    "registered_layouts",
    "unregister_layout",
    "BiasOnly",
    "CONFIG_ATTR",
    "EmptyAttention",
    "ExpertProjection",
    "ExactLayerNorm",
    "ExactRMSNorm",
    "Layout",
    "NEURONS_ATTR",
    "NoHeadsSelfAttention",
    "STRUCTURE_FORMAT_VERSION",
    "STRUCTURE_NAME",
    "UnitSlot",
    "ZeroWidth",
    "expert_probes",
    "find_layers",
    "head_group_size",
    "head_slots",
    "hidden_channel_parameters",
    "hidden_norms",
    "hidden_positions",
    "load_pruned",
    "neuron_slots",
    "original_layer_indices",
    "prune_experts",
    "prune_ffn_neurons",
    "prune_heads",
    "prune_hidden",
    "prune_layers",
    "record_structure",
    "remove_empty_structures",
    "save_pruned",
    "save_structure",
    "structure_summary",
    "zero_hidden_channels",
]
