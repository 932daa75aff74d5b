"""Heads, FFN neurons, hidden channels and layers as pruning units: how important each is, which to remove, and
gradual removal of heads and neurons in training.

Criteria are registered by name, as a call or a class decorator (`@register_channel_criterion("mine")`); the
protocol is in `base`. Head/neuron criteria (`register_unit_criterion`), one file each: `gradient` (Michel et al.
2019), `activation` (no backward pass) and `taylor` (Molchanov et al. 2019; what pruning during fine-tuning
accumulates). Hidden channels (`compute_channel_importance`, `register_channel_criterion`: Minitron's activation
criterion or Taylor) and layers (`compute_layer_importance`, `register_layer_criterion`: block influence as in
ShortGPT, or Minitron's loss when the layer is skipped) have their own modules, `width` and `depth`. The physical
removal itself is `hf_prune.structure`'s job.
"""

from . import activation, gradient, taylor  # noqa: F401  (registers the built-in criteria)
from .base import (
    ChannelCriterion,
    LayerCriterion,
    UnitCriterion,
    available_channel_criteria,
    available_layer_criteria,
    available_unit_criteria,
    normalize_per_layer,
    register_channel_criterion,
    register_layer_criterion,
    register_unit_criterion,
    unregister_channel_criterion,
    unregister_layer_criterion,
    unregister_unit_criterion,
)
from .depth import compute_layer_importance
from .experts import compute_expert_importance, prune_experts_by_importance, select_experts_to_prune
from .gradual import GradualUnitPruner
from .oneshot import compute_head_importance, compute_neuron_importance, prune_by_importance, prune_structured
from .ranking import select_channels_to_prune, select_layers_to_prune
from .selection import select_heads_to_prune, select_neurons_to_prune
from .width import compute_channel_importance

__all__ = [
    "ChannelCriterion",
    "GradualUnitPruner",
    "LayerCriterion",
    "UnitCriterion",
    "available_channel_criteria",
    "available_layer_criteria",
    "available_unit_criteria",
    "compute_channel_importance",
    "compute_expert_importance",
    "compute_head_importance",
    "compute_layer_importance",
    "compute_neuron_importance",
    "normalize_per_layer",
    "prune_by_importance",
    "prune_experts_by_importance",
    "prune_structured",
    "register_channel_criterion",
    "register_layer_criterion",
    "register_unit_criterion",
    "select_channels_to_prune",
    "select_experts_to_prune",
    "select_heads_to_prune",
    "select_layers_to_prune",
    "select_neurons_to_prune",
    "unregister_channel_criterion",
    "unregister_layer_criterion",
    "unregister_unit_criterion",
]
