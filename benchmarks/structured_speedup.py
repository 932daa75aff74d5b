"""Physically smaller, measurably faster: remove 0/25/50/75% of heads and FFN neurons from a fine-tuned MiniLM.

    python benchmarks/structured_speedup.py --dense_path outputs/default/dense --recovery_steps 100

For each fraction: one-shot removal of that fraction of all attention heads and of all FFN neurons (gradient
importance on calibration batches, ranked across layers), a short recovery fine-tune distilled from the dense model,
then parameters, FLOPs per example, test accuracy / macro-F1, and PyTorch latency at batch 1 and 32 (sequence 64,
median over repeats, all arms measured in the same run). Speedup is compared with the FLOP-ratio limit.
Writes JSON and Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, default_data_collator

from hf_prune import PruningConfig, PruningTrainer, prune_structured, save_pruned, structure_summary
from hf_prune.flops import encoder_flops
from hf_prune.commands.train import parse_args as parse_train_args
from hf_prune.commands.job import JobData, arm_training_arguments, train_dense
from hf_prune.metrics import compute_metrics
from hf_prune.recipes.packaged import job_splits, packaged_model_path


@torch.no_grad()
def latency_ms(model: torch.nn.Module, batch: dict, repeats: int) -> float:
    model.eval()
    for _ in range(3):
        model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense_path", default=None, help="fine-tuned dense model; default: fine-tune one first")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--neuron_fractions", nargs="+", type=float, default=None,
                        help="FFN-neuron fraction per arm (default: the same as --fractions, which sets heads)")
    parser.add_argument("--recovery_steps", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate of the recovery")
    parser.add_argument("--hidden_distillation_weight", type=float, default=0.0,
                        help="weight of the hidden-state MSE distillation term during recovery")
    parser.add_argument("--seed", type=int, default=42, help="seed of the recovery fine-tune (data order, dropout); the calibration batches stay fixed")
    parser.add_argument("--calibration_batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "structured_speedup"))
    parser.add_argument("--workdir", default="outputs/bench_structured")
    parser.add_argument("--save_models", action="store_true",
                        help="save each pruned arm with save_pruned to WORKDIR/recover-HEADS-NEURONS/model (for `hf-prune benchmark`)")
    args = parser.parse_args(argv)

    # The job's recipe defaults (`hf-prune train`), with the recovery's steps, learning rate and seed.
    recovery = parse_train_args(["--output_dir", args.workdir, "--max_steps", str(args.recovery_steps),
                                 "--logging_steps", "50", "--learning_rate", str(args.learning_rate),
                                 "--seed", str(args.seed), "--model_name_or_path", packaged_model_path()])
    neuron_fractions = args.neuron_fractions or args.fractions
    if len(neuron_fractions) != len(args.fractions):
        parser.error("--neuron_fractions needs one value per --fractions value")
    job_data = JobData(recovery.job, recovery.data, *job_splits())
    data = job_data.data
    if args.dense_path:
        dense = AutoModelForSequenceClassification.from_pretrained(args.dense_path)
    else:
        dense_job = parse_train_args(["--output_dir", args.workdir])  # the main job's dense arm
        dense = train_dense(job_data, arm_training_arguments(dense_job.training, "dense")).model
    dense.eval()
    calibration = DataLoader(data["train"].with_format("torch"), batch_size=32, shuffle=True,
                             generator=torch.Generator().manual_seed(0), collate_fn=default_data_collator)
    test_batches = {
        size: {k: v for k, v in default_data_collator([data["test"][i] for i in range(size)]).items() if k != "labels"}
        for size in (1, 32)
    }

    rows = []
    for fraction, neuron_fraction in zip(args.fractions, neuron_fractions):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        if fraction > 0 or neuron_fraction > 0:
            prune_structured(model, calibration, head_sparsity=fraction, neuron_sparsity=neuron_fraction,
                             max_batches=args.calibration_batches, progress=False)
        trainer = PruningTrainer(
            model=model,
            args=arm_training_arguments(recovery.training, f"recover-{fraction}-{neuron_fraction}"),
            pruning_config=PruningConfig(target_sparsity=0.0, distillation_alpha=0.9,
                                         distillation_hidden_weight=args.hidden_distillation_weight),
            teacher_model=dense,
            train_dataset=data["train"],
            compute_metrics=compute_metrics,
        )
        if (fraction > 0 or neuron_fraction > 0) and args.recovery_steps > 0:
            trainer.train()
        prune_seconds = time.perf_counter() - start
        if args.save_models:
            save_pruned(model, os.path.join(args.workdir, f"recover-{fraction}-{neuron_fraction}", "model"))
            job_data.tokenizer.save_pretrained(os.path.join(args.workdir, f"recover-{fraction}-{neuron_fraction}", "model"))
        metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
        row = {
            "fraction_removed": fraction,
            "neuron_fraction_removed": neuron_fraction,
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_example": encoder_flops(model, 64),
            "accuracy": metrics["test_accuracy"],
            "macro_f1": metrics["test_macro_f1"],
            "prune_and_recover_seconds": prune_seconds if (fraction > 0 or neuron_fraction > 0) else 0.0,
            "heads_per_layer": structure_summary(model)["heads_per_layer"],
            "intermediate_sizes": structure_summary(model)["intermediate_sizes"],
        }
        for size, batch in test_batches.items():
            row[f"pytorch_ms_b{size}"] = latency_ms(model, batch, args.repeats)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), file=sys.stderr, flush=True)

    base = rows[0]
    for row in rows:
        row["flop_ratio_limit"] = base["flops_per_example"] / row["flops_per_example"]
        for size in (1, 32):
            row[f"speedup_b{size}"] = base[f"pytorch_ms_b{size}"] / row[f"pytorch_ms_b{size}"]
            row[f"speedup_b{size}_of_limit"] = row[f"speedup_b{size}"] / row["flop_ratio_limit"]
    results = {"settings": vars(args), "threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    lines = [
        f"Packaged MiniLM fine-tuned on tweet sentiment; heads and FFN neurons removed one-shot, then "
        f"{args.recovery_steps} recovery steps distilled from the dense model. PyTorch eager, seq 64, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}.",
        "",
        "| heads / neurons removed | params | GFLOPs/ex | FLOP limit | accuracy | macro-F1 | b1 ms | b1 speedup | b32 ms | b32 speedup "
        "| b32 of limit | prune+recover s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['fraction_removed']:.0%} / {r['neuron_fraction_removed']:.0%} | {r['params'] / 1e6:.2f}M | {r['flops_per_example'] / 1e9:.2f} | "
            f"{r['flop_ratio_limit']:.2f}x | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['pytorch_ms_b1']:.1f} | "
            f"{r['speedup_b1']:.2f}x | {r['pytorch_ms_b32']:.1f} | {r['speedup_b32']:.2f}x | "
            f"{r['speedup_b32_of_limit']:.2f} | {r['prune_and_recover_seconds']:.0f} |"
        )
    with open(args.output + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
