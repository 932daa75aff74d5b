"""Heads and FFN neurons as pruning units: how important each is, which to remove, and gradual removal in training.

Criteria are registered by name (`register_unit_criterion`), one file each: `gradient` (Michel et al. 2019),
`activation` (no backward pass) and `taylor` (Molchanov et al. 2019; what pruning during fine-tuning accumulates).
The physical removal itself is `hf_prune.structure`'s job.
"""

from . import activation, gradient, taylor  # noqa: F401  (registers the built-in criteria)
from .base import (
    UnitCriterion,
    available_unit_criteria,
    normalize_per_layer,
    register_unit_criterion,
    unregister_unit_criterion,
)
from .gradual import GradualUnitPruner
from .oneshot import compute_head_importance, compute_neuron_importance, prune_by_importance, prune_structured
from .selection import select_heads_to_prune, select_neurons_to_prune

__all__ = [
    "GradualUnitPruner",
    "UnitCriterion",
    "available_unit_criteria",
    "compute_head_importance",
    "compute_neuron_importance",
    "normalize_per_layer",
    "prune_by_importance",
    "prune_structured",
    "register_unit_criterion",
    "select_heads_to_prune",
    "select_neurons_to_prune",
    "unregister_unit_criterion",
]
