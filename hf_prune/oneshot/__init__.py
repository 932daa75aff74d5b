"""One-shot pruning of (decoder) language models from a calibration set: Wanda, SparseGPT, magnitude."""

from .engine import OneShotResult, oneshot, oneshot_config, oneshot_methods

__all__ = ["OneShotResult", "oneshot", "oneshot_config", "oneshot_methods"]
