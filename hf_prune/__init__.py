"""hf_prune: pruning during fine-tuning for Hugging Face Transformers."""

from .callbacks import HeadPruningCallback, MagnitudePruningCallback, MovementPruningCallback, PruningCallback
from .config import PruningConfig
from .finalize import make_permanent, save_pruning_artifacts
from .importance import (
    compute_head_importance,
    compute_neuron_importance,
    select_heads_to_prune,
    select_neurons_to_prune,
)
from .masks import sparsity_report
from .pruner import Pruner
from .schedules import SparsitySchedule
from .structure import (
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    remove_empty_structures,
    save_pruned,
    save_structure,
    structure_summary,
)
from .structured import prune_structured
from .trainer import PruningTrainer

__version__ = "0.1.0"

__all__ = [
    "HeadPruningCallback",
    "MagnitudePruningCallback",
    "MovementPruningCallback",
    "PruningCallback",
    "PruningConfig",
    "PruningTrainer",
    "Pruner",
    "SparsitySchedule",
    "compute_head_importance",
    "compute_neuron_importance",
    "load_pruned",
    "make_permanent",
    "prune_ffn_neurons",
    "prune_heads",
    "prune_structured",
    "remove_empty_structures",
    "save_pruned",
    "save_structure",
    "select_heads_to_prune",
    "select_neurons_to_prune",
    "structure_summary",
    "save_pruning_artifacts",
    "sparsity_report",
]
