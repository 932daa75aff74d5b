"""Accuracy at high sparsity: dense vs what users write by hand vs hf_prune recipes, side by side, several seeds.

    python benchmarks/sparsity_accuracy.py --configs configs/default.yaml configs/magnitude.yaml --seeds 0 1

Every arm fine-tunes the packaged MiniLM on the packaged tweet-sentiment split for the same number of steps, with the
same learning-rate schedule, batch size and data order per seed, and is scored on the same test split.

- `dense`: plain fine-tuning (also the distillation teacher of hf_prune arms with `distill: true`).
- `torch_prune_baseline`: the recipe from blog posts: `torch.nn.utils.prune.global_unstructured` (L1) over the same
  Linear layers on the same cubic schedule, no distillation.
- `two_lines`: the README's two lines, `MagnitudePruningCallback(PruningConfig(target_sparsity=...))` with every
  other setting at its default, in a plain `Trainer` at the dense arm's learning rate: what a user gets first.
- `two_lines[VARIANT]`: the same two lines with some PruningConfig settings changed (`--two_lines_variants
  local:scope=local cooldown:cooldown_fraction=0.5`): how the defaults were chosen; a variant with another method
  (`obs:method=obs`) runs in `PruningCallback`, the callback of every method.
- one arm per hf_prune config file (`--no_recipes` skips them). A config with `prune_from_dense: true` starts its
  pruned arm from a copy of the seed's dense arm (its teacher) instead of the pretrained weights, as `hf-prune train`
  does: the same steps of its own, on top of the dense arm's.
- `--allocations owl allocated`: the first config's recipe again with non-uniform per-module sparsity at the same
  global target: `owl` (OWL, Yin et al. 2024, computed on that seed's dense model) and `allocated` (the plan of
  `hf-prune sensitivity`, an `allocation.json` given with `--allocation_file`). The first config's own arm is the
  uniform one when it ranks locally (`scope: local`, as `configs/default.yaml`).

- `--budgets 1 3`: every arm again at 3x the steps (`NAME @3x`, compared with `dense @3x`).
- `--two_lines_learning_rates 1e-4 1e-3`: the two-line arms at each rate (a variant may fix its own:
  `NAME:scope=global,learning_rate=1e-3`).
- `--resume`: keep the (arm, seed) rows already in OUTPUT.json and run only the missing ones; a cut run continues,
  and arms or seeds added later join the same table.

Writes JSON and Markdown (mean, spread and per-seed accuracy, macro-F1) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import yaml
from torch.nn.utils import prune
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

from hf_prune import MagnitudePruningCallback, PruningCallback, PruningConfig, PruningTrainer, make_permanent
from hf_prune.commands.job import JobData, arm_training_arguments, score_arm, train_dense
from hf_prune.masks import find_target_modules
from hf_prune.metrics import compute_metrics
from hf_prune.recipes.packaged import job_splits, packaged_model_path
from hf_prune.schedules import SparsitySchedule


class TorchPruneBaseline(TrainerCallback):
    """Global L1 magnitude pruning with torch.nn.utils.prune on a cubic schedule, as a blog post would write it."""

    def __init__(self, config: PruningConfig) -> None:
        self.config = config
        self.pruned_so_far = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.schedule = SparsitySchedule.from_config(self.config, state.max_steps)
        self.parameters = [(m, "weight") for m in find_target_modules(model, self.config.targets).values()]

    def on_step_end(self, args, state, control, **kwargs):
        if not self.schedule.is_update_step(state.global_step):
            return
        target = self.schedule.sparsity_at(state.global_step)
        # `amount` is a fraction of the weights still unpruned: PruningContainer composes successive calls.
        amount = (target - self.pruned_so_far) / (1.0 - self.pruned_so_far)
        if amount > 0:
            prune.global_unstructured(self.parameters, pruning_method=prune.L1Unstructured, amount=amount)
            self.pruned_so_far = target

    def on_train_end(self, args, state, control, model=None, **kwargs):
        make_permanent(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/default.yaml"], help="hf_prune job YAML files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--no_baseline", action="store_true", help="skip the torch.nn.utils.prune arm")
    parser.add_argument("--no_two_lines", action="store_true", help="skip the README's two-line callback arm")
    parser.add_argument("--two_lines_variants", nargs="*", default=[],
                        help="extra two-line arms, each NAME:KEY=VALUE[,KEY=VALUE...] of PruningConfig fields, and "
                        "learning_rate=LR for that arm alone (else --two_lines_learning_rates)")
    parser.add_argument("--allocations", nargs="*", default=[], choices=["owl", "allocated"],
                        help="extra arms of the first config with non-uniform sparsity (see above)")
    parser.add_argument("--allocation_file", default=None,
                        help="allocation.json written by hf-prune sensitivity (for --allocations allocated)")
    parser.add_argument("--no_recipes", action="store_true", help="skip the arms of the --configs files")
    parser.add_argument("--save_dense", action="store_true",
                        help="save each dense arm to WORKDIR/dense-SEED (WORKDIR/dense @3x-SEED past 1x): a "
                        "fine-tuned model for hf-prune optimize, and --dense_path for later runs")
    parser.add_argument("--baseline_learning_rates", nargs="+", type=float, default=None,
                        help="learning rates of the torch.nn.utils.prune arm (default: the dense arm's)")
    parser.add_argument("--two_lines_learning_rates", nargs="+", type=float, default=None,
                        help="learning rates of the two-line arms, one arm each (default: the dense arm's)")
    parser.add_argument("--max_steps", type=int, default=250)
    parser.add_argument("--model_name_or_path", default=None,
                        help="the pretrained model every arm starts from (default: the packaged MiniLM); a local "
                        "folder, such as the packaged all-mpnet-base-v2 that "
                        "hf_prune.recipes.packaged_mpnet.packaged_mpnet_path() unpacks, to see whether a larger "
                        "model keeps more of its accuracy at the same sparsity")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0],
                        help="training budgets as multiples of --max_steps, every arm (dense too) at each: "
                        "`--budgets 1 3`; an arm past 1x is named `NAME @3x` and compared with `dense @3x`")
    parser.add_argument("--dense_path", default=None,
                        help="reuse a dense model fine-tuned with the same job settings and the single --seeds "
                        "value; with {seed} in the path (WORKDIR/dense-{seed}, what --save_dense writes), one per "
                        "seed, and seeds without one are trained; with {tag} as well ('WORKDIR/dense{tag}-{seed}') "
                        "the budget's own (tag ' @3x' past 1x), else only the 1x arm is reused")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "sparsity_accuracy"))
    parser.add_argument("--workdir", default="outputs/bench_sparsity")
    parser.add_argument("--resume", action="store_true",
                        help="keep the arms already in OUTPUT.json and run only the missing (arm, seed) pairs: a cut "
                        "run continues, and new arms or seeds join the same table")
    args = parser.parse_args(argv)
    model_path = args.model_name_or_path or packaged_model_path()
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        parser.error(f"--model_name_or_path {model_path!r}: no config.json there; a local model folder is allowed "
                     "(no model can be downloaded here)")
    model_label = ("Packaged MiniLM" if args.model_name_or_path is None
                   else os.path.basename(os.path.normpath(model_path)))
    if "allocated" in args.allocations and not args.allocation_file:
        parser.error("--allocations allocated needs --allocation_file (allocation.json from hf-prune sensitivity)")
    variants = {}
    for spec in args.two_lines_variants:
        name, _, settings = spec.partition(":")
        try:
            variants[name] = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in settings.split(","))}
            PruningConfig(**{k: v for k, v in variants[name].items() if k != "learning_rate"})
        except (ValueError, TypeError) as err:
            parser.error(f"--two_lines_variants {spec!r}: {err}")

    from hf_prune.commands.train import parse_args as parse_train_args

    arms_config = {}
    for path in args.configs:
        parsed = parse_train_args(["--config", path, "--max_steps", str(args.max_steps),
                                   "--model_name_or_path", model_path])
        arms_config[os.path.splitext(os.path.basename(path))[0]] = (parsed.job, parsed.pruning, parsed.training)
    base_job, _, base_training = next(iter(arms_config.values()))
    job_data = JobData(base_job, parse_train_args(["--config", args.configs[0]]).data, *job_splits())
    data = job_data.data
    baseline_config = PruningConfig(method="magnitude", target_sparsity=next(iter(arms_config.values()))[1].target_sparsity)

    def arm_args(training, name: str, seed: int, learning_rate=None):
        """An arm's TrainingArguments under --workdir: the config's settings, this seed, WORKDIR/NAME-SEED."""
        return arm_training_arguments(dataclasses.replace(training, output_dir=args.workdir), f"{name}-{seed}",
                                      learning_rate=learning_rate, seed=seed)

    results: dict = {"settings": vars(args), "arms": {}}
    if args.resume and os.path.isfile(args.output + ".json"):
        with open(args.output + ".json", encoding="utf-8") as handle:
            earlier = json.load(handle)
        results["arms"] = earlier["arms"]
        results["earlier_settings"] = earlier.get("earlier_settings", []) + [earlier["settings"]]
        if earlier.get("notes"):  # what a person wrote about the rows (a renamed arm, a copied seed)
            results["notes"] = earlier["notes"]

    def done(name, seed) -> bool:
        return str(seed) in results["arms"].get(name, {})

    def record(name, seed, row):
        results["arms"].setdefault(name, {})[str(seed)] = row
        write_results()  # after every arm: a run cut short keeps what it measured, and --resume continues it
        print(f"seed {seed} {name:<22} acc {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f} "
              f"sparsity {row['sparsity']:.4f} ({row['train_seconds']:.0f}s)", file=sys.stderr, flush=True)

    def write_results() -> list[str]:
        """Summary over the arms and seeds done so far."""
        summary = {}
        for name, per_seed in results["arms"].items():
            summary[name] = {
                key: statistics.mean(row[key] for row in per_seed.values()) for key in ("accuracy", "macro_f1", "sparsity")
            }
        results["summary"] = summary
        seeds_done = sorted({int(seed) for per_seed in results["arms"].values() for seed in per_seed})
        lines = [
            f"{model_label} on tweet sentiment, {args.max_steps} steps per 1x of budget (an arm `@3x` trains 3x as "
            f"long), seeds {seeds_done} (of {args.seeds}), test split of {len(data['test'])}; accuracy and macro-F1 "
            "are means over seeds, spread is the sample standard deviation; % of dense is each seed's share of that "
            "seed's dense arm at the same budget, averaged.",
            "",
            "| arm | sparsity | accuracy | spread | % of dense | macro-F1 | per-seed accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        def budget_then_dense_first(name):
            _, at, budget = name.partition(" @")
            return float(budget.rstrip("x")) if at else 1.0, not name.startswith("dense")

        for name in sorted(summary, key=budget_then_dense_first):
            row = summary[name]
            _, at, budget = name.partition(" @")
            # Per seed against that seed's dense arm, then averaged: an arm run on fewer seeds is compared fairly.
            dense_rows = results["arms"].get(f"dense @{budget}" if at else "dense", {})
            shares = [r["accuracy"] / dense_rows[seed]["accuracy"]
                      for seed, r in results["arms"][name].items() if seed in dense_rows]
            share = f"{statistics.mean(shares):.1%}" if shares else "-"
            accuracies = [r["accuracy"] for r in results["arms"][name].values()]
            spread = f"{statistics.stdev(accuracies):.4f}" if len(accuracies) > 1 else "-"
            per_seed = ", ".join(f"{seed}: {r['accuracy']:.4f}" for seed, r in results["arms"][name].items())
            lines.append(
                f"| {name} | {row['sparsity']:.1%} | {row['accuracy']:.4f} | {spread} | {share} | "
                f"{row['macro_f1']:.4f} | {per_seed} |"
            )
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output + ".json", "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        with open(args.output + ".md", "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        return lines

    def run_seed_budget(seed: int, budget: float) -> None:
        """Every arm of one seed trained for `budget` times --max_steps; arms past 1x are named `NAME @Bx`."""
        tag = "" if budget == 1 else f" @{budget:g}x"
        steps = round(args.max_steps * budget)

        def at_budget(training):
            return dataclasses.replace(training, max_steps=steps)

        dense_trainer = []

        def dense_model():
            """The dense arm of this seed and budget, trained (or reloaded with --dense_path) when first needed."""
            if dense_trainer:
                return dense_trainer[0].model
            start = time.perf_counter()
            # `{tag}` in --dense_path names the budget's own saved dense arm (WORKDIR/dense{tag}-{seed}); a path
            # without it holds the 1x arm only.
            dense_path = (args.dense_path.format(seed=seed, tag=tag)
                          if args.dense_path and (budget == 1 or "{tag}" in args.dense_path) else None)
            if dense_path and "{seed}" not in args.dense_path and len(args.seeds) != 1:
                raise SystemExit("--dense_path reuses one dense run: give exactly one --seeds value, or put {seed} in it.")
            reused = dense_path is not None and os.path.isfile(os.path.join(dense_path, "config.json"))
            if dense_path and not reused and "{seed}" not in args.dense_path:
                raise SystemExit(f"--dense_path {dense_path!r} holds no saved model (config.json).")
            if reused:
                dense = Trainer(
                    model=AutoModelForSequenceClassification.from_pretrained(dense_path),
                    args=arm_args(base_training, "dense", seed),
                    compute_metrics=compute_metrics,
                )
            else:
                dense = train_dense(job_data, arm_args(at_budget(base_training), f"dense{tag}", seed))
            record(f"dense{tag}", seed, score_arm(dense, data["test"], baseline_config, time.perf_counter() - start))
            if args.save_dense and not reused:
                dense.save_model()
            dense_trainer.append(dense)
            return dense.model

        for learning_rate in [] if args.no_baseline else args.baseline_learning_rates or [base_training.learning_rate]:
            name = f"torch_prune_baseline (lr {learning_rate:g}){tag}"
            if done(name, seed):
                continue
            start = time.perf_counter()
            trainer = Trainer(
                model=job_data.fresh_model(seed),
                args=arm_args(at_budget(base_training), f"baseline{tag}", seed, learning_rate),
                train_dataset=data["train"], compute_metrics=compute_metrics,
                callbacks=[TorchPruneBaseline(baseline_config)],
            )
            trainer.train()
            record(name, seed, score_arm(trainer, data["test"], baseline_config, time.perf_counter() - start))

        two_line_arms = {} if args.no_two_lines else {"": {}}
        two_line_arms.update(variants)
        for variant, settings in two_line_arms.items():
            settings = dict(settings)
            own_rate = float(settings.pop("learning_rate")) if "learning_rate" in settings else None
            for learning_rate in [own_rate] if own_rate else args.two_lines_learning_rates or [base_training.learning_rate]:
                suffix = f"[{variant}]" if variant else ""
                name = f"two_lines{suffix} (lr {learning_rate:g}){tag}"
                if done(name, seed):
                    continue
                start = time.perf_counter()
                # all else at its default
                two_lines = PruningConfig(target_sparsity=baseline_config.target_sparsity, **settings)
                trainer = Trainer(
                    model=job_data.fresh_model(seed),
                    args=arm_args(at_budget(base_training), f"two_lines{variant}-lr{learning_rate:g}{tag}", seed,
                                  learning_rate),
                    train_dataset=data["train"], compute_metrics=compute_metrics,
                    # A variant with another method (`obs:method=obs`) takes the callback of every method.
                    callbacks=[(MagnitudePruningCallback if two_lines.method == "magnitude" else PruningCallback)(
                        two_lines)],
                )
                trainer.train()
                record(name, seed, score_arm(trainer, data["test"], two_lines, time.perf_counter() - start))

        for name, (job, config, training) in ({} if args.no_recipes else arms_config).items():
            if done(f"{name}{tag}", seed):
                continue
            start = time.perf_counter()
            trainer = PruningTrainer(
                # prune_from_dense: the student starts as a copy of this seed's fine-tuned dense arm (its teacher)
                model=copy.deepcopy(dense_model()) if job.prune_from_dense else job_data.fresh_model(seed),
                args=arm_args(at_budget(training), f"{name}{tag}", seed, job.pruning_learning_rate),
                pruning_config=config,
                teacher_model=dense_model() if job.distill else None,
                train_dataset=data["train"], compute_metrics=compute_metrics,
            )
            trainer.train()
            record(f"{name}{tag}", seed, score_arm(trainer, data["test"], config, time.perf_counter() - start))

        first_name, (first_job, first_config, first_training) = next(iter(arms_config.items()))
        for allocation in args.allocations:
            name = f"{first_name}+{allocation}{tag}"
            if done(name, seed):
                continue
            if allocation == "owl":
                from torch.utils.data import DataLoader
                from transformers import default_data_collator

                from hf_prune import owl_sparsity

                calibration = DataLoader(data["train"].with_format("torch"), batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), collate_fn=default_data_collator)
                overrides = owl_sparsity(dense_model(), calibration, first_config.target_sparsity,
                                         targets=first_config.targets, exclude=first_config.exclude, progress=False)
            else:
                with open(args.allocation_file, encoding="utf-8") as handle:
                    overrides = json.load(handle)
            config = dataclasses.replace(first_config, sparsity_overrides=overrides)
            start = time.perf_counter()
            trainer = PruningTrainer(
                model=job_data.fresh_model(seed),
                args=arm_args(at_budget(first_training), name, seed, first_job.pruning_learning_rate),
                pruning_config=config,
                teacher_model=dense_model() if first_job.distill else None,
                train_dataset=data["train"], compute_metrics=compute_metrics,
            )
            trainer.train()
            record(name, seed, score_arm(trainer, data["test"], config, time.perf_counter() - start))
        if not done(f"dense{tag}", seed):
            dense_model()

    for seed in args.seeds:
        for budget in args.budgets:
            run_seed_budget(seed, budget)
            write_results()

    lines = write_results()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
