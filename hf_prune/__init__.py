"""hf_prune: pruning during fine-tuning for Hugging Face Transformers."""

from .allocation import allocate_sparsity, allocate_units, plan_sparsities
from .callbacks import (
    ConstantPruningCallback,
    HeadPruningCallback,
    MagnitudePruningCallback,
    MovementPruningCallback,
    PruningCallback,
)
from .config import PruningConfig
from .export import ExportError, ExportResult, ExportVerificationError, export_onnx
from .finalize import make_permanent, save_pruning_artifacts
from .masks import sparsity_report
from .methods import PruningMethod, available_methods, register_method
from .oneshot import OneShotResult, oneshot
from .owl import owl_sparsity
from .perplexity import PerplexityResult, evaluate_perplexity
from .pruner import Pruner
from .runtime import create_session
from .schedules import SparsitySchedule
from .semi_structured import is_two_four, to_semi_structured
from .sensitivity import SensitivityResult, analyze_sensitivity
from .structure import (
    load_pruned,
    prune_experts,
    prune_ffn_neurons,
    prune_heads,
    prune_hidden,
    prune_layers,
    remove_empty_structures,
    save_pruned,
    save_structure,
    structure_summary,
    zero_hidden_channels,
)
from .torch_prune import fold_torch_prune
from .trainer import PruningTrainer
from .units import (
    ChannelCriterion,
    LayerCriterion,
    UnitCriterion,
    available_channel_criteria,
    available_layer_criteria,
    available_unit_criteria,
    compute_channel_importance,
    compute_expert_importance,
    compute_head_importance,
    compute_layer_importance,
    compute_neuron_importance,
    prune_structured,
    register_channel_criterion,
    register_layer_criterion,
    register_unit_criterion,
    select_channels_to_prune,
    select_heads_to_prune,
    select_layers_to_prune,
    select_neurons_to_prune,
)
from .version import __version__

__all__ = [
    "ChannelCriterion",
    "ConstantPruningCallback",
    "OneShotResult",
    "PerplexityResult",
    "evaluate_perplexity",
    "is_two_four",
    "oneshot",
    "to_semi_structured",
    "ExportError",
    "ExportResult",
    "ExportVerificationError",
    "HeadPruningCallback",
    "LayerCriterion",
    "MagnitudePruningCallback",
    "MovementPruningCallback",
    "PruningCallback",
    "PruningConfig",
    "PruningMethod",
    "PruningTrainer",
    "Pruner",
    "SensitivityResult",
    "SparsitySchedule",
    "UnitCriterion",
    "__version__",
    "allocate_sparsity",
    "allocate_units",
    "analyze_sensitivity",
    "available_channel_criteria",
    "available_layer_criteria",
    "available_methods",
    "available_unit_criteria",
    "compute_channel_importance",
    "compute_expert_importance",
    "compute_head_importance",
    "compute_layer_importance",
    "compute_neuron_importance",
    "create_session",
    "export_onnx",
    "fold_torch_prune",
    "load_pruned",
    "make_permanent",
    "owl_sparsity",
    "plan_sparsities",
    "prune_experts",
    "prune_ffn_neurons",
    "prune_heads",
    "prune_hidden",
    "prune_layers",
    "prune_structured",
    "register_channel_criterion",
    "register_layer_criterion",
    "register_method",
    "register_unit_criterion",
    "remove_empty_structures",
    "save_pruned",
    "save_structure",
    "select_channels_to_prune",
    "select_heads_to_prune",
    "select_layers_to_prune",
    "select_neurons_to_prune",
    "structure_summary",
    "zero_hidden_channels",
    "save_pruning_artifacts",
    "sparsity_report",
]
