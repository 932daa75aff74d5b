"""Extra cost of pruning per Trainer step, against a plain Trainer step on the same model and data.

    python benchmarks/step_overhead.py --steps 40 --rounds 3

Arms: a plain Trainer, each gradual weight method at 90% unstructured (`obs` with its defaults: a ring of the last
16 gradients filled every step, block Fisher inverses and the weight update only at mask updates, which
`engine_breakdown_ms_per_step` in the JSON shows apart as `update`), and `structured` (half the heads and FFN
neurons masked gradually, removed at the end).

Two measurements per arm, both written to benchmarks/results/step_overhead.{json,md}:

- wall clock: each arm's time per step, median over rounds; arms run interleaved, in an order rotated every round,
  so that drift in the machine's speed and position effects hit all arms alike. On a shared 2-core VM two plain rounds differ by a
  few percent, so this number alone cannot resolve an overhead of 1-3%.
- attributed: inside the same runs, the time spent in the pruning engine's hooks (`Pruner.before_optimizer_step`,
  `after_optimizer_step`, `update`, the method's loss term) plus the extra time of the optimizer step over the plain
  arm's (soft movement's learned scores are stepped by the optimizer), as a fraction of the plain arm's step time.
  These are timed around the engine's own calls, so machine noise moves them far less.
- step loop: the mean wall time of a training step from `on_step_begin` to the end of `on_step_end`, mask updates
  included, the run's start-up and tear-down excluded.

The pruning window covers the whole run (warm-up and cool-down 0, mask updates every `--interval` steps) so the
measured cost includes mask updates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed

from hf_prune import PruningConfig, PruningTrainer
from hf_prune.recipes.packaged import load_sentiment_splits, packaged_model_path, tokenize_splits


class OptimizerTimer(TrainerCallback):
    """Total time in `optimizer.step()` (wrapped on the instance the Trainer hands to callbacks)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        original = optimizer.step

        def timed(*step_args, **step_kwargs):
            start = time.perf_counter()
            try:
                return original(*step_args, **step_kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        optimizer.step = timed


class StepTimer(TrainerCallback):
    """Wall time of every training step, from `on_step_begin` to the end of `on_step_end` (mask updates included):
    the step loop without the run's fixed start-up and tear-down."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self.started)


def time_engine(pruner, totals: dict) -> None:
    """Wrap the engine's per-step entry points on this instance with timers."""
    for name in ("before_optimizer_step", "after_optimizer_step", "update", "loss"):
        original = getattr(pruner, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - start

        setattr(pruner, name, timed)


def run_arm(arm: str, data, model_path: str, steps: int, interval: int, batch: int) -> dict:
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
    engine = defaultdict(float)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, logging_steps=10, save_strategy="no",
            report_to=[], disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, use_cpu=True,
        )
        optimizer_timer, step_timer = OptimizerTimer(), StepTimer()
        if arm == "plain":
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[optimizer_timer, step_timer])
        else:
            # "structured": half the heads and half the FFN neurons masked gradually from Taylor scores read off
            # every step's gradients (hf_prune.units.gradual), removed physically when training ends.
            method, target, units = ("magnitude", 0.0, 0.5) if arm == "structured" else (arm, 0.9, 0.0)
            config = PruningConfig(method=method, target_sparsity=target, head_sparsity=units, neuron_sparsity=units,
                                   warmup_fraction=0.0, cooldown_fraction=0.0, pruning_interval=interval)
            trainer = PruningTrainer(model=model, args=args, pruning_config=config, train_dataset=data,
                                     callbacks=[optimizer_timer, step_timer])
            time_engine(trainer.pruner, engine)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    optimizer = optimizer_timer.seconds
    return {
        "seconds_per_step": total / steps,
        "step_loop_seconds_per_step": sum(step_timer.steps) / len(step_timer.steps),
        "engine_seconds_per_step": sum(engine.values()) / steps,
        "engine_breakdown_ms_per_step": {k: 1000 * v / steps for k, v in engine.items()},
        "optimizer_seconds_per_step": optimizer / steps,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--arms", nargs="+",
                        default=["plain", "magnitude", "movement", "soft_movement", "obs", "structured"])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "step_overhead"))
    args = parser.parse_args(argv)
    if "plain" not in args.arms:
        parser.error("--arms must include plain (the baseline)")

    model_path = packaged_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_sentiment_splits(train_size=args.steps * args.batch)
    data = tokenize_splits(splits, tokenizer, max_length=64)["train"]

    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for round_index in range(args.rounds):
        # Rotate the order each round: the arm that runs right after another can be systematically slower or faster
        # (allocator and cache state), and rotation spreads that over all arms.
        shift = round_index % len(args.arms)
        for arm in args.arms[shift:] + args.arms[:shift]:
            run = run_arm(arm, data, model_path, args.steps, args.interval, args.batch)
            runs[arm].append(run)
            print(f"round {round_index + 1}: {arm:<14} {run['seconds_per_step']:.3f} s/step, engine "
                  f"{1000 * run['engine_seconds_per_step']:.1f} ms/step, optimizer "
                  f"{1000 * run['optimizer_seconds_per_step']:.1f} ms/step", file=sys.stderr)

    def median(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    plain_step, plain_optimizer = median("plain", "seconds_per_step"), median("plain", "optimizer_seconds_per_step")
    arms = {}
    for arm in args.arms:
        engine, optimizer = median(arm, "engine_seconds_per_step"), median(arm, "optimizer_seconds_per_step")
        attributed = engine + max(optimizer - plain_optimizer, 0.0)
        arms[arm] = {
            "seconds_per_step": median(arm, "seconds_per_step"),
            "wall_clock_overhead": median(arm, "seconds_per_step") / plain_step - 1,
            "step_loop_seconds_per_step": median(arm, "step_loop_seconds_per_step"),
            "step_loop_overhead": median(arm, "step_loop_seconds_per_step") / median("plain", "step_loop_seconds_per_step") - 1,
            "engine_ms_per_step": 1000 * engine,
            "extra_optimizer_ms_per_step": 1000 * max(optimizer - plain_optimizer, 0.0),
            "attributed_overhead": attributed / plain_step,
            "runs": runs[arm],
        }
    results = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": vars(args) | {"model": "packaged all-MiniLM-L6-v2", "seq_len": 64},
        "arms": arms,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    lines = [
        f"Per-step cost, MiniLM (22.7M), batch {args.batch}, seq 64, {args.steps} steps x {args.rounds} rounds "
        f"(median), {torch.get_num_threads()} threads, pruning to 90% (structured: half the heads and FFN neurons) with "
        f"mask updates every {args.interval} steps. "
        "Attributed: time in the pruning engine plus extra optimizer time, over the plain step (robust to machine "
        "noise); step loop: mean time from step begin to step end (mask updates included, start-up and tear-down "
        "excluded); wall clock: whole train() time per step (noisy by a few percent here).",
        "",
        "| arm | s/step | engine ms/step | extra optimizer ms/step | attributed overhead | step-loop overhead | "
        "wall-clock overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in arms.items():
        lines.append(
            f"| {arm} | {row['seconds_per_step']:.3f} | {row['engine_ms_per_step']:.1f} | "
            f"{row['extra_optimizer_ms_per_step']:.1f} | {row['attributed_overhead']:+.1%} | "
            f"{row['step_loop_overhead']:+.1%} | {row['wall_clock_overhead']:+.1%} |"
        )
    with open(args.output + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
