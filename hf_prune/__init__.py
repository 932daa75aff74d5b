"""hf_prune: pruning during fine-tuning for Hugging Face Transformers."""

from .callbacks import MagnitudePruningCallback, MovementPruningCallback, PruningCallback
from .config import PruningConfig
from .finalize import make_permanent, save_pruning_artifacts
from .masks import sparsity_report
from .pruner import Pruner
from .schedules import SparsitySchedule
from .trainer import PruningTrainer

__version__ = "0.1.0"

__all__ = [
    "MagnitudePruningCallback",
    "MovementPruningCallback",
    "PruningCallback",
    "PruningConfig",
    "PruningTrainer",
    "Pruner",
    "SparsitySchedule",
    "make_permanent",
    "save_pruning_artifacts",
    "sparsity_report",
]
