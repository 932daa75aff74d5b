"""Extra cost of pruning per Trainer step, against a plain Trainer step on the same model and data.

    python benchmarks/step_overhead.py --steps 40 --rounds 3

Arms run interleaved (plain, magnitude, movement, plain, ...) so that drift in the machine's speed hits all arms
alike; each arm's time per step is the median over rounds of (train time / steps). The pruning window covers the
whole run (warm-up and cool-down 0, mask updates every `--interval` steps) so the measured cost includes mask
updates. Writes JSON and Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments, set_seed

from hf_prune import PruningConfig, PruningTrainer
from hf_prune.recipes.packaged import load_sentiment_splits, packaged_model_path, tokenize_splits


def run_arm(arm: str, data, model_path: str, steps: int, interval: int, batch: int) -> float:
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, logging_steps=10, save_strategy="no",
            report_to=[], disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, use_cpu=True,
        )
        if arm == "plain":
            trainer = Trainer(model=model, args=args, train_dataset=data)
        else:
            config = PruningConfig(method=arm, target_sparsity=0.9, warmup_fraction=0.0, cooldown_fraction=0.0,
                                   pruning_interval=interval)
            trainer = PruningTrainer(model=model, args=args, pruning_config=config, train_dataset=data)
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--arms", nargs="+", default=["plain", "magnitude", "movement", "soft_movement"])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "step_overhead"))
    args = parser.parse_args(argv)

    model_path = packaged_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_sentiment_splits(train_size=args.steps * args.batch)
    data = tokenize_splits(splits, tokenizer, max_length=64)["train"]

    times: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for round_index in range(args.rounds):
        for arm in args.arms:
            seconds = run_arm(arm, data, model_path, args.steps, args.interval, args.batch)
            times[arm].append(seconds)
            print(f"round {round_index + 1}: {arm:<14} {seconds:.3f} s/step", file=sys.stderr)

    plain = statistics.median(times["plain"])
    results = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": vars(args) | {"model": "packaged all-MiniLM-L6-v2", "seq_len": 64},
        "arms": {
            arm: {"seconds_per_step": statistics.median(v), "all": v, "overhead": statistics.median(v) / plain - 1}
            for arm, v in times.items()
        },
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    lines = [
        f"Per-step cost, MiniLM (22.7M), batch {args.batch}, seq 64, {args.steps} steps x {args.rounds} rounds "
        f"(median), {torch.get_num_threads()} threads, pruning to 90% with mask updates every {args.interval} steps.",
        "",
        "| arm | s/step | overhead vs plain Trainer |",
        "|---|---|---|",
    ]
    for arm, row in results["arms"].items():
        lines.append(f"| {arm} | {row['seconds_per_step']:.3f} | {row['overhead']:+.1%} |")
    with open(args.output + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
