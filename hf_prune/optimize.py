"""`hf-prune optimize`: from a fine-tuned classifier to a faster ONNX Runtime model, aimed at a target.

    hf-prune optimize --model_name_or_path outputs/default/dense --target_speedup 2.8 --quantize dynamic \\
        --output_dir outputs/optimize

One command runs the pipeline practitioners describe (prune, recover, export, quantize, measure):

1. score every attention head and FFN neuron of the fine-tuned model once, on a few training batches;
2. choose how much to remove. Latency depends on the shapes only, so with `--target_speedup` candidate shapes
   (the same fraction of heads and of neurons, lowest importance first across layers) are exported and timed against
   the dense model in ONNX Runtime in seconds each, before any training, and the least pruning that meets the target
   is kept (`hf_prune.latency`). With `--max_accuracy_drop` alone, the most pruning whose recovered model stays within
   the drop on the validation split is found by bisection (one recovery per probe);
3. remove those units and recover with a short fine-tune distilled from the dense model, once per recovery seed
   (the best on the validation split is kept; all are reported). `--target_sparsity` adds unstructured sparsity to
   the remaining matrices during recovery;
4. save `OUT/model` (reloads with `load_pruned`), export `OUT/onnx` (with `create_session`; INT8 with
   `--quantize dynamic`) and benchmark dense against the result in ONNX Runtime on this machine;
5. write `OUT/report.json`, `OUT/report.md` and `OUT/report.png`. A target that is not met is said so, with the
   closest point reached.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, default_data_collator
from transformers.utils import logging

from .config import PruningConfig
from .data import DataArguments
from .files import atomic_write_text, staged_directory
from .finalize import add_results_to_model_card
from .job import JobArguments, JobData, arm_training_arguments, trainer_kwargs
from .latency import LatencyProbe, fraction_grid, search_least_fraction
from .metrics import compute_metrics
from .structure import load_pruned, prune_hidden, prune_layers, structure_summary
from .structure.io import resolve_directory
from .trainer import PruningTrainer
from .units import (
    available_unit_criteria,
    compute_channel_importance,
    compute_head_importance,
    compute_layer_importance,
    compute_neuron_importance,
    prune_by_importance,
    select_channels_to_prune,
    select_layers_to_prune,
)

logger = logging.get_logger(__name__)

REPORT_NAME = "report"
QUANTIZATION_MODES = ("dynamic",)
# The hidden size --hidden_fraction leaves is rounded to a multiple of this: matrix kernels run fastest on such widths.
HIDDEN_MULTIPLE = 8


@dataclass
class OptimizeArguments:
    """What `hf-prune optimize` aims at and how it searches; every field is a command-line option."""

    _argument_group_name = "optimize"  # HfArgumentParser groups these options under this title in --help

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Fine-tuned sequence-classification model (folder or Hub id): the dense baseline, the "
                  "distillation teacher and the model that is pruned."},
    )
    target_speedup: Optional[float] = field(
        default=None,
        metadata={"help": "Latency target: the result must run this many times faster than the dense model in ONNX "
                  "Runtime (at --speedup_batch_size, in --speedup_precision). The least pruning that meets it is "
                  "chosen (default: none; give this and/or --max_accuracy_drop)."},
    )
    max_accuracy_drop: Optional[float] = field(
        default=None,
        metadata={"help": "Accuracy budget in points (0.5 = half a point) on the validation split. Alone: the most "
                  "pruning that stays within it (one recovery per probe). With --target_speedup: checked and "
                  "reported (default: none)."},
    )
    quantize: Optional[Literal["dynamic"]] = field(
        default=None,
        metadata={"help": "Also export a dynamic-INT8 graph (OUT/onnx/model_quantized.onnx) and measure it "
                  "(default: none)."},
    )
    speedup_precision: Literal["fp32", "int8"] = field(
        default="fp32",
        metadata={"help": "Which graph of the result --target_speedup applies to, always against dense fp32: fp32, "
                  "or int8 (needs --quantize dynamic)."},
    )
    speedup_batch_size: int = field(default=32, metadata={"help": "Batch size the speedup target applies to."})
    speedup_margin: float = field(
        default=0.03,
        metadata={"help": "Headroom over the target when choosing a shape (0.03: a candidate must time 3%% faster "
                  "than the target), so that timing noise does not leave the final model just short."},
    )
    fraction_step: float = field(
        default=0.05, metadata={"help": "Step of the candidate fractions of heads and FFN neurons removed."}
    )
    max_fraction: float = field(
        default=0.9, metadata={"help": "Largest fraction of heads and FFN neurons that may be removed."}
    )
    hidden_fraction: float = field(
        default=0.0,
        metadata={"help": "Width: fraction of the hidden size (the residual stream: embeddings, every LayerNorm and "
                  "every Linear that reads or writes it) removed in every candidate, the lowest activation importance "
                  "first (Minitron), the size left a multiple of 8. LayerNorms and the other hidden-size costs that "
                  "head and neuron removal leave shrink with it. 0 keeps the width."},
    )
    layers_to_remove: int = field(
        default=0,
        metadata={"help": "Depth: whole transformer layers removed in every candidate, the lowest block influence "
                  "first (ShortGPT, Minitron). 0 keeps every layer."},
    )
    recovery_seeds: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Seeds of the recovery fine-tune, one recovery each; the best on the validation split is "
                  "kept, all are reported (default: --seed only)."},
    )
    importance: str = field(
        default="gradient",
        metadata={"help": "Head/neuron importance criterion: a registered unit criterion (gradient, activation, "
                  "taylor, ...)."},
    )
    calibration_batches: int = field(
        default=16, metadata={"help": "Training batches the importance is scored on."}
    )
    distill: bool = field(default=True, metadata={"help": "Distil the recovery from the dense model."})
    timing_rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds per candidate shape."})
    timing_repeats: int = field(default=5, metadata={"help": "Timed calls per model, batch size and round."})
    benchmark_rounds: int = field(default=5, metadata={"help": "Rounds of the final dense-vs-result benchmark."})
    benchmark_repeats: int = field(default=6, metadata={"help": "Timed calls per arm and round in that benchmark."})

    def __post_init__(self) -> None:
        if self.target_speedup is not None and self.target_speedup <= 1.0:
            raise ValueError(f"--target_speedup {self.target_speedup!r} is invalid: a speedup above 1, e.g. 2.5.")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ValueError(f"--max_accuracy_drop {self.max_accuracy_drop!r} is invalid: points of accuracy, >= 0.")
        if self.quantize is not None and self.quantize not in QUANTIZATION_MODES:
            raise ValueError(f"--quantize {self.quantize!r} is not allowed; choose one of {list(QUANTIZATION_MODES)}.")
        if self.speedup_precision not in ("fp32", "int8"):
            raise ValueError(f"--speedup_precision {self.speedup_precision!r} is not allowed; choose fp32 or int8.")
        if self.speedup_precision == "int8" and self.quantize is None:
            raise ValueError("--speedup_precision int8 needs --quantize dynamic (the INT8 graph it applies to).")
        if self.speedup_margin < 0:
            raise ValueError(f"--speedup_margin {self.speedup_margin!r} is invalid: >= 0 (0.03 = 3% headroom).")
        if not 0.0 < self.fraction_step < 1.0:
            raise ValueError(f"--fraction_step {self.fraction_step!r} is invalid: must lie in (0, 1).")
        if not self.fraction_step <= self.max_fraction < 1.0:
            raise ValueError(f"--max_fraction {self.max_fraction!r} is invalid: must lie in [--fraction_step "
                             f"{self.fraction_step}, 1).")
        for name in ("speedup_batch_size", "calibration_batches", "timing_rounds", "timing_repeats",
                     "benchmark_rounds", "benchmark_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)!r} is invalid: a positive integer.")
        if isinstance(self.hidden_fraction, bool) or not 0.0 <= self.hidden_fraction < 1.0:
            raise ValueError(f"--hidden_fraction {self.hidden_fraction!r} is invalid: a fraction of the hidden size in "
                             "[0, 1), e.g. 0.25.")
        if isinstance(self.layers_to_remove, bool) or not isinstance(self.layers_to_remove, int) \
                or self.layers_to_remove < 0:
            raise ValueError(f"--layers_to_remove {self.layers_to_remove!r} is invalid: a whole number of layers, >= 0.")
        if self.recovery_seeds is not None and not self.recovery_seeds:
            raise ValueError("--recovery_seeds is empty: give at least one seed, or leave it out to use --seed.")
        if self.importance not in available_unit_criteria():
            raise ValueError(f"--importance {self.importance!r} is not a registered unit criterion; choose one of "
                             f"{list(available_unit_criteria())}.")


@dataclass
class Recovery:
    """One recovery fine-tune of one candidate shape with one seed."""

    fraction: float
    seed: int
    validation: Optional[dict[str, float]]
    test: dict[str, float]
    seconds: float
    trainer: Any = None  # kept for the chosen one only

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "trainer"}


def validate_optimize(opt: OptimizeArguments, pruning_config: PruningConfig, job_data: Optional[JobData] = None) -> None:
    """Refuse, before any model is scored or trained, what `optimize` cannot do with these options and this data."""
    if opt.target_speedup is None and opt.max_accuracy_drop is None:
        raise ValueError("give a target: --target_speedup X (e.g. 2.5) and/or --max_accuracy_drop POINTS (e.g. 1.0).")
    if not opt.model_name_or_path:
        raise ValueError("--model_name_or_path is not set: give the fine-tuned model to optimize (a folder, e.g. "
                         "outputs/default/dense from hf-prune train, or a Hub id).")
    if pruning_config.head_sparsity or pruning_config.neuron_sparsity:
        raise ValueError(f"--head_sparsity {pruning_config.head_sparsity} / --neuron_sparsity "
                         f"{pruning_config.neuron_sparsity}: optimize chooses the fractions itself from the target; "
                         "leave them at 0 (hf-prune train takes fixed fractions).")
    if job_data is not None and opt.max_accuracy_drop is not None and job_data.data.get("validation") is None:
        raise ValueError(f"--max_accuracy_drop {opt.max_accuracy_drop} is checked on a validation split and the data "
                         "has none: give --validation_file, a Hub dataset with one (--validation_split_name), or "
                         "--validation_size to carve one from train.")


def _evaluate(trainer: Trainer, dataset: Optional[datasets.Dataset], prefix: str) -> Optional[dict[str, float]]:
    if dataset is None:
        return None
    metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
    return {"accuracy": metrics[f"{prefix}_accuracy"], "macro_f1": metrics[f"{prefix}_macro_f1"]}


def _raw_test(job_data: JobData) -> datasets.Dataset:
    """The test split's text column(s) with class ids in `label`, for `run_benchmark`."""
    classes = job_data.classes
    return classes.texts["test"].add_column("label", classes.labels["test"])


def run_optimize(
    opt: OptimizeArguments,
    data_args: DataArguments,
    pruning_config: PruningConfig,
    training_args: TrainingArguments,
    splits: Optional[Mapping[str, datasets.Dataset]] = None,
    sources: Union[None, str, Mapping[str, str]] = None,
    job_data: Optional[JobData] = None,
) -> dict[str, Any]:
    """Prune `opt.model_name_or_path` to the target, recover, export, benchmark and report (see the module docstring).

    Args:
        opt, data_args, pruning_config, training_args: the option groups of `hf-prune optimize`. `training_args`
            drive each recovery (`max_steps` is its budget); `pruning_config` its distillation and any unstructured
            sparsity (`target_sparsity`, 0 by default).
        splits, sources: ready splits instead of `data_args`' source (see `hf_prune.data.load_raw_splits`).
        job_data: data already loaded for this model (then `splits` and `sources` are not used).

    Returns:
        The report (also `output_dir/report.json`): target and whether it was met, the dense model's scores, every
        candidate measured, every recovery, the chosen shape and the benchmark rows.
    """
    from .benchmark import BenchmarkArguments, run_benchmark
    from .export import export_onnx, require_onnx

    wall = time.perf_counter()
    validate_optimize(opt, pruning_config)
    require_onnx()
    if job_data is None:
        job_data = JobData(JobArguments(model_name_or_path=opt.model_name_or_path), data_args, splits, sources)
    validate_optimize(opt, pruning_config, job_data)
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    data = job_data.data
    seeds = list(opt.recovery_seeds or [training_args.seed])
    phases: dict[str, float] = {}

    # ---- the dense model: must be a fine-tuned classifier of these labels
    dense = load_pruned(opt.model_name_or_path).float().eval()
    if not type(dense).__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"--model_name_or_path {opt.model_name_or_path!r} loads as {type(dense).__name__}, not a "
                         "sequence classifier: fine-tune one first (hf-prune train writes OUTPUT_DIR/dense).")
    names = job_data.label_names
    dense_names = [str(dense.config.id2label[i]) for i in range(dense.config.num_labels)]
    if dense.config.num_labels != len(names) or (dense_names != names
                                                  and dense_names != [f"LABEL_{i}" for i in range(len(names))]):
        raise ValueError(f"--model_name_or_path {opt.model_name_or_path!r} predicts {dense_names} but the data has "
                         f"the labels {names}: optimize needs the model fine-tuned on this data.")
    eval_args = dataclasses.replace(training_args, output_dir=os.path.join(out, "recovery", "dense"),
                                    push_to_hub=False)
    dense_trainer = Trainer(model=dense, args=eval_args, compute_metrics=compute_metrics,
                            data_collator=default_data_collator)
    logger.info(f"dense model: scoring {opt.model_name_or_path} on the validation and test splits")
    dense_scores = {"validation": _evaluate(dense_trainer, data.get("validation"), "validation"),
                    "test": _evaluate(dense_trainer, data["test"], "test")}

    # ---- importance, once
    start = time.perf_counter()
    calibration = DataLoader(data["train"].with_format("torch"), batch_size=training_args.per_device_train_batch_size,
                             shuffle=True, generator=torch.Generator().manual_seed(training_args.seed),
                             collate_fn=default_data_collator)
    head_importance = compute_head_importance(dense, calibration, method=opt.importance,
                                              max_batches=opt.calibration_batches)
    neuron_importance = compute_neuron_importance(dense, calibration, method=opt.importance,
                                                  max_batches=opt.calibration_batches)
    layers_gone: list[int] = []
    if opt.layers_to_remove:
        num_layers = structure_summary(dense)["num_layers"]
        if opt.layers_to_remove >= num_layers:
            raise ValueError(f"--layers_to_remove {opt.layers_to_remove} is invalid: {opt.model_name_or_path!r} has "
                             f"{num_layers} layers and at least one must stay.")
        layer_importance = compute_layer_importance(dense, calibration, max_batches=opt.calibration_batches)
        layers_gone = select_layers_to_prune(layer_importance, opt.layers_to_remove, model=dense)
    channels_gone: list[int] = []
    if opt.hidden_fraction:
        channel_importance = compute_channel_importance(dense, calibration, max_batches=opt.calibration_batches)
        channels_gone = select_channels_to_prune(channel_importance, opt.hidden_fraction, model=dense,
                                                 multiple_of=HIDDEN_MULTIPLE)
    phases["importance_seconds"] = time.perf_counter() - start
    extra = "".join([f", layers {layers_gone}" if layers_gone else "",
                     f", {len(channels_gone)} hidden channels" if channels_gone else ""])

    def shaped(fraction: float) -> torch.nn.Module:
        model = copy.deepcopy(dense)
        # Heads and neurons first, while the layers still have their original numbering.
        prune_by_importance(model, head_importance, neuron_importance, fraction, fraction)
        if layers_gone:
            prune_layers(model, layers_gone)
        if channels_gone:
            prune_hidden(model, channels_gone)
        return model

    recovery_config = dataclasses.replace(pruning_config, head_sparsity=0.0, neuron_sparsity=0.0)

    def recover(fraction: float, seed: int) -> Recovery:
        args = arm_training_arguments(training_args, os.path.join("recovery", f"{fraction:.2f}-seed{seed}"),
                                      seed=seed)
        args = dataclasses.replace(args, push_to_hub=False)
        logger.info(f"recovery: {fraction:.0%} of heads and FFN neurons removed{extra}, seed {seed}, "
                    f"{args.max_steps} steps at lr {args.learning_rate:g}"
                    f"{', distilled from the dense model' if opt.distill else ''}")
        start = time.perf_counter()
        trainer = PruningTrainer(model=shaped(fraction), args=args, pruning_config=recovery_config,
                                 teacher_model=dense if opt.distill else None, **trainer_kwargs(job_data))
        trainer.train()
        result = Recovery(fraction=fraction, seed=seed, validation=_evaluate(trainer, data.get("validation"),
                                                                               "validation"),
                          test=_evaluate(trainer, data["test"], "test"), seconds=time.perf_counter() - start,
                          trainer=trainer)
        logger.info(f"recovery: {fraction:.0%} removed, seed {seed}: validation accuracy {_fmt(result.validation)}, "
                    f"test accuracy {_fmt(result.test)} ({result.seconds:.0f} s)")
        return result

    def drop_points(result: Recovery) -> float:
        return (dense_scores["validation"]["accuracy"] - result.validation["accuracy"]) * 100

    # ---- choose the shape
    grid = fraction_grid(opt.fraction_step, opt.max_fraction)
    batch_sizes = sorted({1, opt.speedup_batch_size})
    recoveries: list[Recovery] = []
    start = time.perf_counter()
    with LatencyProbe(dense, seq_len=job_data.max_length, batch_sizes=batch_sizes,
                      precision=opt.speedup_precision, rounds=opt.timing_rounds, repeats=opt.timing_repeats,
                      workdir=out) as probe:
        if opt.target_speedup is not None:
            goal = opt.target_speedup * (1 + opt.speedup_margin)
            chosen, tried, search_met = search_least_fraction(lambda f: probe.measure(shaped(f), f), grid, goal,
                                                              opt.speedup_batch_size)
            if not search_met:
                logger.warning(f"hf_prune optimize: even {chosen.fraction:.0%} of heads and neurons removed times "
                               f"{chosen.speedup[opt.speedup_batch_size]:.2f}x, short of --target_speedup "
                               f"{opt.target_speedup}: continuing with that closest shape.")
            phases["search_seconds"] = time.perf_counter() - start
        else:
            # Most pruning within the accuracy budget: bisection, one recovery per probe (accuracy falls with the
            # fraction removed); every probe is also timed for the report.
            tried, best, low, high = [], None, 0, len(grid) - 1
            while low <= high:
                middle = (low + high) // 2
                tried.append(probe.measure(shaped(grid[middle]), grid[middle]))
                result = recover(grid[middle], seeds[0])
                recoveries.append(result)
                if drop_points(result) <= opt.max_accuracy_drop:
                    best, low = result, middle + 1
                else:
                    high = middle - 1
                # Keep one model in memory: the best within budget, else the closest to it so far.
                keep = best or min(recoveries, key=drop_points)
                for r in recoveries:
                    if r is not keep:
                        r.trainer = None
            closest = best or min(recoveries, key=drop_points)
            chosen = next(p for p in tried if p.fraction == closest.fraction)
            search_met = best is not None
            phases["search_seconds"] = time.perf_counter() - start
    fraction = chosen.fraction

    # ---- recover with every seed (one is done already when the accuracy search ran)
    start = time.perf_counter()
    final = [r for r in recoveries if r.fraction == fraction and r.trainer is not None]
    for seed in seeds:
        if not any(r.seed == seed for r in final):
            result = recover(fraction, seed)
            final.append(result)
            recoveries.append(result)
    has_validation = data.get("validation") is not None
    best = max(final, key=lambda r: r.validation["accuracy"]) if has_validation else final[0]
    for r in final:
        if r is not best:
            r.trainer = None  # free the other seeds' models
    phases["recovery_seconds"] = time.perf_counter() - start + sum(r.seconds for r in recoveries if r not in final)

    # ---- save, export, benchmark
    start = time.perf_counter()
    model_dir, onnx_dir = os.path.join(out, "model"), os.path.join(out, "onnx")
    trainer = best.trainer
    with staged_directory(model_dir) as staging:
        trainer.save_model(staging)
        add_results_to_model_card(trainer, {"dense (the model optimized)": dense_scores["test"], "this model": best.test},
                                  f"the test split ({len(data['test'])} examples; {job_data.description})")
        trainer.args.output_dir = staging  # create_model_card writes into args.output_dir
        try:
            trainer.create_model_card(model_name=os.path.basename(os.path.abspath(out)),
                                      finetuned_from=opt.model_name_or_path, dataset=job_data.description,
                                      tasks="text-classification")
        finally:
            trainer.args.output_dir = os.path.join(out, "recovery")
    export = export_onnx(model_dir, onnx_dir, optimize=None, quantize=opt.quantize, overwrite=True)
    phases["export_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    bench_args = BenchmarkArguments(
        checkpoints=[resolve_directory(opt.model_name_or_path), model_dir], names=["dense", "optimized"],
        output_dir=os.path.join(out, "benchmark"), batch_sizes=batch_sizes, seq_len=job_data.max_length,
        rounds=opt.benchmark_rounds, repeats=opt.benchmark_repeats, eval_size=len(data["test"]),
        text_columns=job_data.classes.text_columns, label_column="label", int8=opt.quantize is not None,
        runtimes=["onnxruntime"], optimize=None, exports=[None, onnx_dir],
    )
    benchmark = run_benchmark(bench_args, eval_dataset=_raw_test(job_data), tokenizer=job_data.tokenizer,
                              eval_name=f"test split ({job_data.description})")
    phases["benchmark_seconds"] = time.perf_counter() - start

    # ---- report
    precision = "int8" if opt.speedup_precision == "int8" else "fp32"
    result_row = next(r for r in benchmark["rows"] if r["name"] == "optimized" and r["precision"] == precision)
    achieved = result_row[f"speedup_b{opt.speedup_batch_size}"]
    target: dict[str, Any] = {"speedup": opt.target_speedup, "max_accuracy_drop": opt.max_accuracy_drop,
                              "speedup_precision": precision, "speedup_batch_size": opt.speedup_batch_size,
                              "achieved_speedup": achieved}
    if opt.target_speedup is not None:
        target["speedup_met"] = achieved >= opt.target_speedup
    if opt.max_accuracy_drop is not None:
        drop = drop_points(best)
        target["validation_drop_points"] = drop
        target["accuracy_met"] = search_met if opt.target_speedup is None else drop <= opt.max_accuracy_drop
    target["met"] = all(v for k, v in target.items() if k.endswith("_met"))
    summary = structure_summary(best.trainer.model)
    report = {
        "target": target,
        "chosen": {"fraction_removed": fraction, "heads_per_layer": summary["heads_per_layer"],
                   "intermediate_sizes": summary["intermediate_sizes"], "layers_removed": layers_gone,
                   "num_layers": summary["num_layers"], "hidden_size": summary["hidden_size"],
                   "original_hidden_size": summary["original_hidden_size"], "seed": best.seed,
                   "selected_by": "validation accuracy" if has_validation else "first seed (no validation split)"},
        "dense": dense_scores,
        "candidates": [p.to_dict() for p in tried],
        "recoveries": [r.to_dict() for r in recoveries],
        "seeds": _seed_summary(final, dense_scores),
        "benchmark": benchmark["rows"],
        "export": {"files": export.files, "sizes_bytes": export.sizes_bytes, "max_abs_diff": export.max_abs_diff},
        "outputs": {"model": model_dir, "onnx": onnx_dir, "benchmark": bench_args.output_dir},
        "data": {"description": job_data.description, "label_names": names,
                 "examples": job_data.classes.num_examples(), "max_length": job_data.max_length},
        "settings": {"optimize": asdict(opt), "pruning_config": recovery_config.to_dict(),
                     "training_arguments": json.loads(training_args.to_json_string()),
                     "threads": benchmark["settings"]["threads"],
                     "onnxruntime": benchmark["settings"].get("onnxruntime"), "torch": torch.__version__},
        "phases": phases,
    }
    report["wall_seconds"] = time.perf_counter() - wall
    write_report(report, out, benchmark)
    return report


def _seed_summary(final: list[Recovery], dense: dict[str, Any]) -> dict[str, Any]:
    """Mean and spread over the recovery seeds of the chosen shape, on test (and validation)."""
    summary: dict[str, Any] = {"seeds": [r.seed for r in final]}
    for split in ("test", "validation"):
        if dense[split] is None:
            continue
        for key in ("accuracy", "macro_f1"):
            values = [getattr(r, split)[key] for r in final]
            summary[f"{split}_{key}_mean"] = statistics.mean(values)
            summary[f"{split}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[f"{split}_drop_points_mean"] = (dense[split]["accuracy"] - summary[f"{split}_accuracy_mean"]) * 100
    return summary


def format_report(report: dict[str, Any]) -> str:
    """report.md: the verdict, the candidates tried, the recoveries, dense vs result in ONNX Runtime."""
    target, chosen, settings = report["target"], report["chosen"], report["settings"]
    batch = target["speedup_batch_size"]
    goal = []
    if target["speedup"] is not None:
        goal.append(f"{target['speedup']:g}x faster in ONNX Runtime {target['speedup_precision']} at batch {batch}")
    if target["max_accuracy_drop"] is not None:
        goal.append(f"at most {target['max_accuracy_drop']:g} points of validation accuracy lost")
    verdict = "met" if target["met"] else "NOT MET"
    lines = [f"# hf-prune optimize: {verdict}", "",
             f"Target: {' and '.join(goal)}. Result: {chosen['fraction_removed']:.0%} of attention heads and FFN "
             f"neurons removed{_width_depth(chosen)}, {target['achieved_speedup']:.2f}x at batch {batch} "
             f"({target['speedup_precision']}) in the final benchmark."]
    if "validation_drop_points" in target:
        lines[-1] += f" Validation accuracy {target['validation_drop_points']:+.2f} points lost (best seed)."
    if not target["met"]:
        lines += ["", "**The target was not met**; the closest point reached is reported below. Allow more pruning "
                  "(--max_fraction), more recovery (--max_steps), or relax the target."]
    seeds = report["seeds"]
    test_drop = seeds["test_drop_points_mean"]
    lines += ["", f"Data: {report['data']['description']}. Wall time {report['wall_seconds'] / 60:.1f} min "
              f"({', '.join(f'{k[:-8]} {v:.0f} s' for k, v in report['phases'].items())}), "
              f"{settings['threads']} threads, ONNX Runtime {settings['onnxruntime']}.", ""]

    lines += ["## Candidate shapes tried (timed in ONNX Runtime before training)", ""]
    if _width_depth(chosen):
        lines += [f"Every candidate also has{_width_depth(chosen)[1:]}.", ""]
    lines += ["| heads+neurons removed | params | FLOP limit | b1 ms | b1 speedup | "
              f"b{batch} ms | b{batch} speedup | dense b{batch} ms (same rounds) |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(report["candidates"], key=lambda p: p["fraction"]):
        ms, sp = ({int(k): v for k, v in p[key].items()} for key in ("ms", "speedup"))
        dense_ms = {int(k): v for k, v in p["dense_ms"].items()}
        mark = " **(chosen)**" if p["fraction"] == chosen["fraction_removed"] else ""
        lines.append(f"| {p['fraction']:.0%}{mark} | {p['parameters'] / 1e6:.2f}M | {p['flop_ratio_limit']:.2f}x | "
                     f"{ms[1]:.1f} | {sp[1]:.2f}x | {ms[batch]:.1f} | {sp[batch]:.2f}x | {dense_ms[batch]:.1f} |")
    lines += ["", "## Recoveries", "",
              f"{settings['training_arguments']['max_steps']} steps at lr {settings['training_arguments']['learning_rate']:g}"
              f"{', distilled from the dense model' if settings['optimize']['distill'] else ''}. Dense: validation "
              f"{_fmt(report['dense']['validation'])}, test {_fmt(report['dense']['test'])}.", "",
              "| removed | seed | validation accuracy | test accuracy | test macro-F1 | time (s) |", "|---|---|---|---|---|---|"]
    for r in report["recoveries"]:
        mark = " **(kept)**" if r["fraction"] == chosen["fraction_removed"] and r["seed"] == chosen["seed"] else ""
        lines.append(f"| {r['fraction']:.0%} | {r['seed']}{mark} | {_fmt(r['validation'])} | "
                     f"{r['test']['accuracy']:.4f} | {r['test']['macro_f1']:.4f} | {r['seconds']:.0f} |")
    if len(seeds["seeds"]) > 1:
        lines += ["", f"Over the {len(seeds['seeds'])} seeds of the chosen shape: test accuracy "
                  f"{seeds['test_accuracy_mean']:.4f} ± {seeds['test_accuracy_std']:.4f} "
                  f"({-test_drop:+.2f} points vs dense), macro-F1 {seeds['test_macro_f1_mean']:.4f}."]

    lines += ["", "## Dense vs result in ONNX Runtime (one interleaved run, test split)", "",
              "| model | graph | accuracy | Δ pts | macro-F1 | size MB | b1 p50 ms | b1 speedup | "
              f"b{batch} p50 ms | b{batch} speedup | FLOP limit | of limit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["benchmark"]:
        lines.append(
            f"| {r['name']} | {r['precision']} | {r.get('accuracy', float('nan')):.4f} | "
            f"{r.get('accuracy_delta_points') or 0:+.2f} | {r.get('macro_f1', float('nan')):.4f} | {r['size_mb']:.1f} | "
            f"{r['p50_ms_b1']:.1f} | {r.get('speedup_b1', 1):.2f}x | {r[f'p50_ms_b{batch}']:.1f} | "
            f"{r.get(f'speedup_b{batch}', 1):.2f}x | {r['flop_ratio_limit']:.2f}x | "
            f"{_fmt_optional(r.get('speedup_of_flop_limit'))} |")
    lines += ["", f"Model: `{report['outputs']['model']}` (`hf_prune.load_pruned`); ONNX: `{report['outputs']['onnx']}` "
              "(`hf_prune.create_session`)."]
    return "\n".join(lines) + "\n"


def _width_depth(chosen: dict[str, Any]) -> str:
    parts = []
    if chosen.get("layers_removed"):
        parts.append(f"layers {chosen['layers_removed']} removed ({chosen['num_layers']} left)")
    if chosen.get("hidden_size") is not None and chosen.get("original_hidden_size", chosen["hidden_size"]) != chosen["hidden_size"]:
        parts.append(f"hidden size {chosen['original_hidden_size']} -> {chosen['hidden_size']}")
    return "".join(f", {part}" for part in parts)


def _fmt(scores: Optional[dict[str, float]]) -> str:
    return "-" if scores is None else f"{scores['accuracy']:.4f}"


def _fmt_optional(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_report(report: dict[str, Any], output_dir: str, benchmark: dict[str, Any]) -> dict[str, str]:
    """report.json, report.md and (with matplotlib) report.png, the accuracy-latency plot, in `output_dir`."""
    from .plot import plot_accuracy_latency

    paths = {"json": os.path.join(output_dir, f"{REPORT_NAME}.json"),
             "markdown": os.path.join(output_dir, f"{REPORT_NAME}.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["markdown"], format_report(report))
    png = plot_accuracy_latency(benchmark, os.path.join(output_dir, f"{REPORT_NAME}.png"))
    if png:
        paths["png"] = png
    return paths

