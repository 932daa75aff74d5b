"""Finished phases of a long command kept on disk with what produced them, so that rerunning the same command after a
kill continues instead of starting from nothing.

A phase (importance scores, the candidates a search timed, ...) is saved as `OUT/phases/<name>.pt` with a record of
what produced it: the options that phase depends on and the identity of its inputs (the model folder's config and
weight files, the text files' contents). A rerun reuses a phase whose record matches and refuses, naming what
differs, one whose record does not -- the rule a Trainer checkpoint resume follows: a result is only taken as good
for the run that made it. Files are written atomically (a phase killed mid-save is simply not there).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import torch
from transformers.utils import logging

from ..files import atomic_torch_save

logger = logging.get_logger(__name__)

PHASES_DIR = "phases"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
# The TrainingArguments that change what a training phase produces (not where it logs or saves).
RESULT_TRAINING_ARGUMENTS = (
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "seed", "data_seed", "weight_decay", "warmup_steps", "warmup_ratio", "lr_scheduler_type", "optim", "bf16",
    "fp16", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon")


def training_record(args: Any) -> dict[str, Any]:
    """The TrainingArguments of `RESULT_TRAINING_ARGUMENTS`, as a phase record holds them (`training.NAME`)."""
    values = json.loads(args.to_json_string())
    return {f"training.{name}": values.get(name) for name in RESULT_TRAINING_ARGUMENTS}


def dataset_identity(dataset: Any) -> Optional[str]:
    """A `datasets.Dataset`'s content as a short hash (its Arrow table serialised): the same examples, in the same
    order, with the same columns give the same string, wherever they were loaded from."""
    if dataset is None:
        return None
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    table = dataset.data.table
    if getattr(dataset, "_indices", None) is not None:  # a select/shuffle view: the rows it shows, in its order
        table = dataset.with_format(None).flatten_indices().data.table
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return f"data:{hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]}"


def identity(path: Optional[str]) -> Optional[str]:
    """What a command read from `path`, as a short string that changes when the input changes: a file's content
    hash; for a model folder, the hash of its config and weight files' names, sizes and modification times (hashing
    gigabytes of weights on every run would cost more than the phases it saves); anything else (a Hub id) as is."""
    if not path:
        return None
    digest = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return f"file:{digest.hexdigest()[:16]}"
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(full):
                stat = os.stat(full)
                digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return f"folder:{digest.hexdigest()[:16]}"
    return f"name:{path}"


class PhaseMismatch(ValueError):
    """A kept phase was made by other options or inputs than this run's (the message names the differences)."""


class PhaseStore:
    """`fetch` a finished phase made by the same options and inputs, `keep` one just finished.

    Args:
        output_dir: the command's output folder; phases live in `output_dir/phases`.
        enabled: False starts every phase over (and overwrites what is kept).
        option: the command-line option that turns reuse off, named in messages.
    """

    def __init__(self, output_dir: str, enabled: bool = True, option: str = "--resume_phases") -> None:
        self.directory = os.path.join(output_dir, PHASES_DIR)
        self.enabled, self.option = enabled, option
        self.reused: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.pt")

    def fetch(self, name: str, produced_by: dict[str, Any], marker: bool = False) -> Optional[Any]:
        """The kept result of phase `name` when `produced_by` matches its record; None when there is none (or reuse
        is off); PhaseMismatch naming the differences when it was made by something else. A `marker` (a phase that only
        says another one started) is not listed in `reused`."""
        path = self.path(name)
        if not self.enabled or not os.path.isfile(path):
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        recorded = json.loads(saved["produced_by"])
        wanted = json.loads(json.dumps(produced_by, sort_keys=True, default=str))
        if recorded != wanted:
            changes = [f"{key}: {recorded.get(key)!r} then, {wanted.get(key)!r} now"
                       for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]
            raise PhaseMismatch(f"{path} holds the {name} phase of another run ({'; '.join(changes)}). Run the same "
                             f"command to continue it, give another --output_dir, or {self.option} false to start "
                             "over.")
        if not marker:
            logger.info(f"{name}: reusing the finished phase kept in {path}")
            self.reused.append(name)
        return saved["result"]

    def keep(self, name: str, produced_by: dict[str, Any], result: Any) -> None:
        """Save phase `name`'s result (tensors, numbers, strings, lists and dicts of them) with its record."""
        record = json.dumps(produced_by, sort_keys=True, default=str)
        atomic_torch_save({"produced_by": record, "result": result}, self.path(name))
