"""One process of a distributed (or single-process) pruning run on a tiny BERT, for tests/test_distributed.py.

Launched as `torchrun --standalone --nproc_per_node 2 train_worker.py OUT METHOD PER_DEVICE_BATCH` (DDP over gloo on
CPU) or plainly with `python` (one process, the reference). Every rank writes what it ended with to
OUT/rank{RANK}.pt: the masks, the method's scores and the weights; rank 0 saves the model to OUT/model.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

from conftest import random_classification_data, tiny_bert, training_args  # noqa: E402

from hf_prune import PruningConfig, PruningTrainer  # noqa: E402


def main(out: str, method: str, per_device_batch: int) -> None:
    torch.set_num_threads(1)
    # No dropout: the ranks draw different random numbers, and the point is to compare with one process.
    model = tiny_bert(dropout=0.0)
    config = PruningConfig(method=method, target_sparsity=0.75, warmup_fraction=0.1, cooldown_fraction=0.2,
                           pruning_interval=2)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # average_tokens_across_devices=False: Transformers 5 (where it defaults to True) multiplies the loss by the number
    # of processes for models that take loss kwargs, and a sequence classifier's loss is a per-device mean, so its
    # DDP gradients would be twice one process's.
    args = training_args(os.path.join(out, "run"), max_steps=12, per_device_train_batch_size=per_device_batch,
                         learning_rate=0.1, optim="sgd", average_tokens_across_devices=False,
                         **({"ddp_backend": "gloo"} if distributed else {}))
    trainer = PruningTrainer(model=model, args=args, pruning_config=config,
                             train_dataset=random_classification_data(96))
    trainer.train()
    pruner = trainer.pruner
    rank = trainer.args.process_index
    torch.save({
        "world_size": trainer.args.world_size,
        "masks": {n: m.clone() for n, m in pruner.masks.items() if m is not None},
        "method": pruner.method.state_dict(),
        "weights": {n: p.detach().clone() for n, p in trainer.model.state_dict().items()},
        "sparsity": pruner.measured_sparsity(),
    }, os.path.join(out, f"rank{rank}.pt"))
    trainer.save_model(os.path.join(out, "model"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
