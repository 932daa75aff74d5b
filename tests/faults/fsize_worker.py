"""One save or export run under a file-size limit, as a full disk would stop it (tests/test_faults.py).

    python fsize_worker.py SCENARIO DIR LIMIT_BYTES

The limit (RLIMIT_FSIZE) is set right before the write under test; SIGXFSZ is ignored so that the write fails with
EFBIG, as it fails with ENOSPC on a full disk, instead of the process being killed. Prints one JSON line: the
exception's type and message (or "none"). Everything the scenario needs was prepared in DIR by the test.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from conftest import random_classification_data, training_args  # noqa: E402
from hf_prune import PruningConfig, PruningTrainer, load_pruned, save_pruned  # noqa: E402


def limit(size: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def changed_model(directory: str):
    model = load_pruned(os.path.join(directory, "model"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # a successful save would be told apart from the previous one
    return model


class LimitAfterFirstSave(TrainerCallback):
    def __init__(self, size: int) -> None:
        self.size = size

    def on_save(self, args, state, control, **kwargs):
        limit(self.size)


def run(scenario: str, directory: str, size: int) -> None:
    if scenario == "save_pruned":
        model = changed_model(directory)
        limit(size)
        save_pruned(model, os.path.join(directory, "model"))
    elif scenario == "save_model":
        trainer = PruningTrainer(model=changed_model(directory), args=training_args(os.path.join(directory, "run"),
                                                                                    max_steps=1),
                                 pruning_config=PruningConfig(target_sparsity=0.5),
                                 train_dataset=random_classification_data(n=8))
        trainer.train()
        limit(size)
        trainer.save_model(os.path.join(directory, "model"))
    elif scenario == "checkpoint":
        args = training_args(os.path.join(directory, "run"), max_steps=2, save_strategy="steps", save_steps=1)
        trainer = PruningTrainer(model=changed_model(directory), args=args, callbacks=[LimitAfterFirstSave(size)],
                                 pruning_config=PruningConfig(target_sparsity=0.5),
                                 train_dataset=random_classification_data(n=16))
        trainer.train()
    elif scenario == "export":
        from hf_prune import export_onnx

        limit(size)
        export_onnx(os.path.join(directory, "model"), os.path.join(directory, "onnx"), optimize=None)
    elif scenario.startswith("cli:"):
        from hf_prune.cli import main

        with open(os.path.join(directory, "argv.json"), encoding="utf-8") as handle:
            argv = json.load(handle)
        limit(size)
        main([scenario[4:], *argv])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    name, folder, bytes_ = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        run(name, folder, bytes_)
        outcome = {"error": "none", "message": ""}
    except BaseException as err:  # noqa: B902 - the test reads what happened, SystemExit included
        outcome = {"error": type(err).__name__, "message": str(err)}
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps(outcome), flush=True)
