"""One process of an FSDP2 pruning run (`fully_shard` over gloo on CPU), or the single-process reference, for
tests/test_distributed.py.

Launched as `torchrun --standalone --nproc_per_node 2 fsdp_worker.py OUT METHOD [resume]` or plainly with `python`. Trainer
runs FSDP only on accelerators, so this is the loop Trainer would run, calling the Pruner where the callback does:
gradients scored and masked before the optimizer step, masks re-applied after it, the schedule after each step.
Each process sees its half of every global batch of 8. Every rank writes OUT/rank{RANK}.pt: masks, the whole
weights (gathered) and the measured sparsity.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

from conftest import random_classification_data, tiny_bert  # noqa: E402

from hf_prune import PruningConfig, Pruner  # noqa: E402
from hf_prune.sharding import full, is_sharded  # noqa: E402

STEPS, BATCH = 12, 8


def build(method: str, world: int, weights=None):
    model = tiny_bert(dropout=0.0)
    if weights is not None:
        model.load_state_dict(weights)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        assert is_sharded(model.bert.encoder.layer[0].attention.self.query.weight)
    pruner = Pruner(model, PruningConfig(method=method, target_sparsity=0.75, warmup_fraction=0.1,
                                         cooldown_fraction=0.2, pruning_interval=2))
    # Plain SGD: the comparison with one process is up to rounding, which Adam would blow up on near-zero gradients.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach_optimizer(optimizer)
    pruner.start(STEPS)
    return model, pruner, optimizer


def train(model, pruner, optimizer, steps: range, rank: int, world: int) -> None:
    data = random_classification_data(STEPS * BATCH)
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    share = BATCH // world
    for step in steps:
        rows = slice(step * BATCH + rank * share, step * BATCH + (rank + 1) * share)
        model(input_ids=ids[rows], labels=labels[rows]).loss.backward()
        pruner.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        pruner.after_optimizer_step()
        pruner.update(step + 1)


def main(out: str, method: str, resume: bool) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    model, pruner, optimizer = build(method, world)
    if resume:
        # Half the run, then what a checkpoint holds -- the whole weights and the pruning state, both gathered on
        # every rank and written by rank 0 -- read back into a new sharded model and Pruner, which finish the run.
        train(model, pruner, optimizer, range(STEPS // 2), rank, world)
        checkpoint = os.path.join(out, "checkpoint.pt")
        weights = {n: full(p.detach()).clone() for n, p in model.state_dict().items()}
        state = pruner.state_dict()
        if rank == 0:
            torch.save({"weights": weights, "state": state}, checkpoint)
        if world > 1:
            dist.barrier()
        saved = torch.load(checkpoint, weights_only=True)
        model, pruner, optimizer = build(method, world, saved["weights"])
        pruner.load_state_dict(saved["state"])
        train(model, pruner, optimizer, range(STEPS // 2, STEPS), rank, world)
    else:
        train(model, pruner, optimizer, range(STEPS), rank, world)
    torch.save({
        "world_size": world,
        "masks": {n: m.clone() for n, m in pruner.masks.items() if m is not None},
        "weights": {n: full(m.weight.detach()).clone() for n, m in pruner.modules.items()},
        "scores": {n: full(s).clone() for n, s in pruner.scores.items()},
        "sparsity": pruner.measured_sparsity(),
    }, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        # Every rank past its last collective before any tears the group down: a rank that destroys it while the
        # other still talks to it makes gloo abort that one at exit ("terminate called without an active
        # exception"), an intermittent failure of this test.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    main(sys.argv[1], sys.argv[2], resume=len(sys.argv) > 3 and sys.argv[3] == "resume")
