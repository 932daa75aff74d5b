"""One-shot pruning of (decoder) language models from a calibration set: Wanda, SparseGPT, magnitude."""

from .engine import OneShotResult, oneshot

__all__ = ["OneShotResult", "oneshot"]
