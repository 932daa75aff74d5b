"""The six `hf-prune` commands, one module each, built on the library and never imported by it.

Each module owns its options (dataclasses with the command's defaults as field defaults, parsed by
`HfArgumentParser` with an optional `--config` YAML file), its work and its report, and exposes `NAME`,
`make_parser()` and `main(argv) -> exit status`. `hf_prune.cli` only dispatches to them:

- `train`: a dense and a pruned arm fine-tuned side by side (`commands.job` holds the classification job both
  `train` and `optimize` use);
- `optimize`: a fine-tuned classifier pruned to a latency or accuracy target, in phases (`OptimizeRun`);
- `sensitivity`, `oneshot`, `export`, `benchmark`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> (module, one line for `hf-prune --help`), in the order listed there; a module is imported only when its
# command runs, so listing them imports none.
COMMANDS = {
    "train": ("hf_prune.commands.train", "fine-tune a dense and a pruned model side by side and compare them"),
    "optimize": ("hf_prune.commands.optimize", "prune a fine-tuned model to a latency target, recover, export, measure"),
    "export": ("hf_prune.commands.export", "export a checkpoint to ONNX (verified, optimised, optional INT8)"),
    "benchmark": ("hf_prune.commands.benchmark", "latency, size and accuracy of checkpoints in PyTorch and ONNX Runtime"),
    "sensitivity": ("hf_prune.commands.sensitivity",
                    "per-module pruning sensitivity of a fine-tuned model, and a sparsity plan"),
    "oneshot": ("hf_prune.commands.oneshot",
                "prune a causal LM once from calibration text (Wanda, SparseGPT), with perplexity"),
}


def command(name: str) -> ModuleType:
    """The module of command `name` (a ValueError naming the commands for an unknown one)."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; choose one of {sorted(COMMANDS)}.")
    return importlib.import_module(COMMANDS[name][0])
