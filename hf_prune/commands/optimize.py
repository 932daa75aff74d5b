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

import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, default_data_collator
from transformers.utils import logging

from ..config import PruningConfig
from ..data import DataArguments
from ..export import ExportResult, export_onnx, require_onnx
from ..files import hold_output_dir, last_complete_checkpoint, staged_directory
from ..finalize import add_results_to_model_card
from ..latency import LatencyPoint, LatencyProbe, fraction_grid, search_least_fraction
from ..metrics import compute_metrics
from ..structure import load_pruned, structure_summary
from ..structure.io import resolve_directory
from ..trainer import PruningTrainer
from ..units import available_layer_criteria, available_unit_criteria
from .benchmark import BenchmarkArguments, run_benchmark
from .job import JobArguments, JobData, arm_training_arguments, trainer_kwargs
from .optimize_lm import format_lm_report, is_causal_lm, run_optimize_lm
from .optimize_report import fmt_scores, format_report, seed_summary, write_report
from .phases import PhaseStore, dataset_identity, identity, training_record
from .parsing import (
    PACKAGED_DATA_HELP,
    CommandParser,
    ModelArguments,
    packaged_splits,
    parse_command,
    show_progress,
    with_defaults,
)
from .shapes import Importance, cut, score_structures
from .train import TrainDataArguments, TrainTrainingArguments

logger = logging.get_logger(__name__)

QUANTIZATION_MODES = ("dynamic",)


@dataclass
class OptimizeArguments(ModelArguments):
    """What `hf-prune optimize` aims at and how it searches; every field is a command-line option."""

    _argument_group_name = "optimize"  # HfArgumentParser groups these options under this title in --help

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
    layer_importance: str = field(
        default="block_influence",
        metadata={"help": "Layer importance criterion for --layers_to_remove and the causal-LM search: a registered "
                  "layer criterion (block_influence: how little a layer changes its input; loss: how much the loss "
                  "rises when it is skipped)."},
    )
    recovery_seeds: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Seeds of the recovery fine-tune, one recovery each; the best on the validation split is "
                  "kept, all are reported (default: --seed only)."},
    )
    importance: Optional[str] = field(
        default=None,
        metadata={"help": "Head/neuron importance criterion: a registered unit criterion (gradient, activation, "
                  "taylor, ...). Default: gradient for classifiers (the loss on their labels), activation for causal "
                  "LMs (Minitron's activation norms on calibration text)."},
    )
    calibration_batches: int = field(
        default=16, metadata={"help": "Training batches the importance is scored on."}
    )
    distill: bool = field(default=True, metadata={"help": "Distil the recovery from the dense model."})
    timing_rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds per candidate shape."})
    timing_repeats: int = field(default=5, metadata={"help": "Timed calls per model, batch size and round."})
    benchmark_rounds: int = field(default=5, metadata={"help": "Rounds of the final dense-vs-result benchmark."})
    benchmark_repeats: int = field(default=6, metadata={"help": "Timed calls per arm and round in that benchmark."})
    task: Literal["auto", "sequence-classification", "causal-lm"] = field(
        default="auto", metadata={"help": "What the model is: read from its config (auto), or given."})
    target_params: Optional[float] = field(
        default=None, metadata={"help": "Causal LMs: the largest fraction of the dense model's parameters the result "
                                        "may keep, e.g. 0.6 (default: none)."})
    block_size: int = field(default=256, metadata={"help": "Causal LMs: tokens per training window and per "
                                                           "perplexity window."})
    eval_tokens: int = field(default=16384, metadata={"help": "Causal LMs: held-out tokens the perplexity is "
                                                              "measured on (0: all)."})
    prompt_tokens: int = field(default=64, metadata={"help": "Causal LMs: prompt length of the prefill and decode "
                                                             "timings."})
    decode_tokens: int = field(default=32, metadata={"help": "Causal LMs: tokens generated per decode timing."})
    search_axes: Optional[bool] = field(
        default=None,
        metadata={"help": "Causal LMs: search the axes (heads+neurons, hidden width, both, depth, depth with width; "
                  "width first, as Minitron recommends): each family's least pruning that meets the target, timed "
                  "before training, the lowest held-out perplexity wins. Default: on unless --layers_to_remove or "
                  "--hidden_fraction fixes an axis."},
    )
    search_steps: int = field(
        default=0,
        metadata={"help": "Causal LMs with the axis search: distillation steps each family's shape gets before they "
                  "are compared (Minitron's short retraining: rankings right after the cut can change); 0 compares "
                  "the perplexity right after the cut."},
    )
    onnx_decode: bool = field(
        default=True,
        metadata={"help": "Causal LMs: also time prefill and decode in ONNX Runtime with the key/value cache (Optimum's "
                  "export; needs the onnx extra and a result whose layers are alike, e.g. --uniform_layers or depth/"
                  "width pruning; otherwise the report says why it was skipped)."},
    )
    resume_phases: bool = field(
        default=True,
        metadata={"help": "Reuse the phases a killed run of the same command finished (the dense model's scores, "
                  "importance, timed candidates, each recovery seed and its Trainer checkpoints, the export; kept in "
                  "OUT/phases with the options and inputs that made them); a phase made by other options or inputs "
                  "is refused with the difference named. false starts over."},
    )
    uniform_layers: bool = field(
        default=False, metadata={"help": "Causal LMs: every layer keeps the same numbers of heads and FFN neurons, "
                                         "and OUT/model's config says them, so plain from_pretrained loads it."})

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
        for seed in self.recovery_seeds or ():
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise ValueError(f"--recovery_seeds {seed!r} is invalid: each seed a whole number in [0, 2**32) "
                                 "(what Trainer's set_seed takes).")
        if self.target_params is not None and not 0.0 < self.target_params < 1.0:
            raise ValueError(f"--target_params {self.target_params!r} is invalid: the fraction of parameters kept, "
                             "in (0, 1), e.g. 0.6.")
        for name in ("block_size", "prompt_tokens", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)!r} is invalid: a positive integer.")
        if self.eval_tokens < 0:
            raise ValueError(f"--eval_tokens {self.eval_tokens!r} is invalid: a token count, or 0 for all.")
        if self.search_steps < 0:
            raise ValueError(f"--search_steps {self.search_steps!r} is invalid: a number of steps, >= 0.")
        if self.search_axes and (self.layers_to_remove or self.hidden_fraction):
            raise ValueError(f"--search_axes true searches depth and width itself; it cannot be combined with "
                             f"--layers_to_remove {self.layers_to_remove} / --hidden_fraction {self.hidden_fraction}.")
        if self.layer_importance not in available_layer_criteria():
            raise ValueError(f"--layer_importance {self.layer_importance!r} is not a registered layer criterion; "
                             f"choose one of {list(available_layer_criteria())}.")
        if self.importance is not None and self.importance not in available_unit_criteria():
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
    model_dir: Optional[str] = None  # the recovered model and its card, saved when the recovery finished
    reused: bool = False  # taken from a finished phase of an earlier run of the same command

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_optimize(opt: OptimizeArguments, pruning_config: PruningConfig) -> None:
    """Refuse, before any data or model is loaded, what `optimize` cannot do with these options."""
    if opt.target_speedup is None and opt.max_accuracy_drop is None:
        raise ValueError("give a target: --target_speedup X (e.g. 2.5) and/or --max_accuracy_drop POINTS (e.g. 1.0)"
                         "; for a causal LM, --target_params F and/or --target_speedup X.")
    if opt.target_params is not None:
        raise ValueError(f"--target_params {opt.target_params} applies to causal LMs; a classifier is optimized for "
                         "--target_speedup (ONNX Runtime) and/or --max_accuracy_drop.")
    if opt.search_axes or opt.search_steps:
        raise ValueError(f"--search_axes {opt.search_axes} / --search_steps {opt.search_steps} apply to causal LMs; "
                         "a classifier's axes are chosen with --layers_to_remove and --hidden_fraction.")
    if not opt.model_name_or_path:
        raise ValueError("--model_name_or_path is not set: give the fine-tuned model to optimize (a folder, e.g. "
                         "outputs/default/dense from hf-prune train, or a Hub id).")
    if pruning_config.head_sparsity or pruning_config.neuron_sparsity:
        raise ValueError(f"--head_sparsity {pruning_config.head_sparsity} / --neuron_sparsity "
                         f"{pruning_config.neuron_sparsity}: optimize chooses the fractions itself from the target; "
                         "leave them at 0 (hf-prune train takes fixed fractions).")


def validate_data(opt: OptimizeArguments, job_data: JobData) -> None:
    """Refuse, before any model is scored or trained, what `optimize` cannot do with this data."""
    if opt.max_accuracy_drop is not None and job_data.data.get("validation") is None:
        raise ValueError(f"--max_accuracy_drop {opt.max_accuracy_drop} is checked on a validation split and the data "
                         "has none: give --validation_file, a Hub dataset with one (--validation_split_name), or "
                         "--validation_size to carve one from train.")


def _evaluate(trainer: Trainer, dataset: Optional[datasets.Dataset], prefix: str) -> Optional[dict[str, float]]:
    if dataset is None:
        return None
    metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
    return {"accuracy": metrics[f"{prefix}_accuracy"], "macro_f1": metrics[f"{prefix}_macro_f1"]}


def _plain(value: Any) -> Any:
    """NumPy scalars (ONNX Runtime's measurements) as Python numbers, for a phase record."""
    return value.item() if hasattr(value, "item") else str(value)


def _raw_test(job_data: JobData) -> datasets.Dataset:
    """The test split's text column(s) with class ids in `label`, for `run_benchmark`."""
    classes = job_data.classes
    return classes.texts["test"].add_column("label", classes.labels["test"])


@dataclass
class Search:
    """What the search phase chose: the candidate kept, every candidate timed, whether the target was met, and the
    recoveries it ran (the accuracy search recovers each probe)."""

    chosen: Any  # hf_prune.latency.LatencyPoint
    tried: list
    met: bool
    recoveries: list[Recovery]


class OptimizeRun:
    """One `hf-prune optimize` run in phases: score, search, cut (`shaped`), recover, export, benchmark, report.

    Each phase is a method taking what it needs and returning what it made; `run_optimize` calls them in order. The
    dense model is loaded once and stays the distillation teacher; `phases` holds each phase's seconds.
    """

    def __init__(self, opt: OptimizeArguments, pruning_config: PruningConfig, training_args: TrainingArguments,
                 job_data: JobData) -> None:
        self.opt, self.training_args, self.job_data = opt, training_args, job_data
        self.recovery_config = dataclasses.replace(pruning_config, head_sparsity=0.0, neuron_sparsity=0.0)
        self.out = training_args.output_dir
        self.data = job_data.data
        self.seeds = list(opt.recovery_seeds or [training_args.seed])
        self.batch_sizes = sorted({1, opt.speedup_batch_size})
        self.phases: dict[str, float] = {}
        # Finished phases kept in OUT/phases with what produced them: a rerun of the same command continues.
        self.store = PhaseStore(self.out, enabled=opt.resume_phases)
        self.inputs = {"model": identity(opt.model_name_or_path), "labels": job_data.label_names,
                       **{f"data.{name}": dataset_identity(split) for name, split in self.data.items()}}
        self.dense, self.dense_scores = self.load_dense()
        self.importance: Optional[Importance] = None

    def record(self, phase: str, fraction: Optional[float] = None, seed: Optional[int] = None) -> dict[str, Any]:
        """What phase `phase` depends on (options and inputs), as the phase store compares it."""
        opt, args = self.opt, self.training_args
        record = {**self.inputs, "importance": opt.importance, "layer_importance": opt.layer_importance,
                  "calibration_batches": opt.calibration_batches, "layers_to_remove": opt.layers_to_remove,
                  "hidden_fraction": opt.hidden_fraction, "batch_size": args.per_device_train_batch_size,
                  "seed": args.seed}
        if phase in ("dense", "importance"):
            return record
        recovery = {"pruning_config": self.recovery_config.to_dict(), "distill": opt.distill, **training_record(args)}
        if phase == "search":
            record.update({name: getattr(opt, name) for name in (
                "target_speedup", "max_accuracy_drop", "speedup_margin", "fraction_step", "max_fraction",
                "speedup_batch_size", "speedup_precision", "quantize", "timing_rounds", "timing_repeats")})
            if opt.target_speedup is None:  # the accuracy search recovers every probe
                record.update(recovery)
            return record
        record.update({**recovery, "fraction": fraction, "recovery_seed": seed})
        return record

    # ------------------------------------------------------------------------------------------- dense model
    def load_dense(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The model to optimize, checked to be a fine-tuned classifier of these labels, and its scores."""
        opt, names = self.opt, self.job_data.label_names
        dense = load_pruned(opt.model_name_or_path).float().eval()
        if not type(dense).__name__.endswith("ForSequenceClassification"):
            raise ValueError(f"--model_name_or_path {opt.model_name_or_path!r} loads as {type(dense).__name__}, not "
                             "a sequence classifier: fine-tune one first (hf-prune train writes OUTPUT_DIR/dense).")
        dense_names = [str(dense.config.id2label[i]) for i in range(dense.config.num_labels)]
        if dense.config.num_labels != len(names) or (dense_names != names
                                                      and dense_names != [f"LABEL_{i}" for i in range(len(names))]):
            raise ValueError(f"--model_name_or_path {opt.model_name_or_path!r} predicts {dense_names} but the data "
                             f"has the labels {names}: optimize needs the model fine-tuned on this data.")
        scores = self.store.fetch("dense", self.record("dense"))
        if scores is not None:
            return dense, scores
        eval_args = dataclasses.replace(self.training_args, output_dir=os.path.join(self.out, "recovery", "dense"),
                                        push_to_hub=False)
        trainer = Trainer(model=dense, args=eval_args, compute_metrics=compute_metrics,
                          data_collator=default_data_collator)
        logger.info(f"dense model: scoring {opt.model_name_or_path} on the validation and test splits")
        scores = {"validation": _evaluate(trainer, self.data.get("validation"), "validation"),
                  "test": _evaluate(trainer, self.data["test"], "test")}
        self.store.keep("dense", self.record("dense"), scores)
        return dense, scores

    # ------------------------------------------------------------------------------------------------ score
    def score(self) -> Importance:
        """Importance of heads and neurons, and the layers / hidden channels every candidate loses, scored once."""
        args, start = self.training_args, time.perf_counter()
        kept = self.store.fetch("importance", self.record("importance"))
        if kept is not None:
            self.importance = Importance(**kept)
            return self.importance
        calibration = DataLoader(self.data["train"].with_format("torch"), batch_size=args.per_device_train_batch_size,
                                 shuffle=True, generator=torch.Generator().manual_seed(args.seed),
                                 collate_fn=default_data_collator)
        self.importance = score_structures(self.dense, calibration, self.opt)
        self.store.keep("importance", self.record("importance"), asdict(self.importance))
        self.phases["importance_seconds"] = time.perf_counter() - start
        return self.importance

    # -------------------------------------------------------------------------------------------------- cut
    def shaped(self, fraction: float) -> torch.nn.Module:
        """A copy of the dense model with `fraction` of heads and neurons removed, and the layers and channels."""
        return cut(self.dense, self.importance, fraction)

    # ---------------------------------------------------------------------------------------------- recover
    def recover(self, fraction: float, seed: int) -> Recovery:
        """One recovery fine-tune of the `fraction` shape with `seed`, distilled from the dense model, saved with its
        model card to OUT/recovery/FRACTION-seedSEED/model; a finished one of an earlier run of the same command is
        reused, and an unfinished one continues from its last Trainer checkpoint (--save_strategy steps)."""
        opt, found = self.opt, self.importance
        arm = f"{fraction:.2f}-seed{seed}"
        record = self.record("recovery", fraction, seed)
        args = arm_training_arguments(self.training_args, os.path.join("recovery", arm), seed=seed)
        args = dataclasses.replace(args, push_to_hub=False)
        model_dir = os.path.join(args.output_dir, "model")
        kept = self.store.fetch(f"recovery-{arm}", record) if os.path.isdir(model_dir) else None
        if kept is not None:
            return Recovery(**{**kept, "model_dir": model_dir, "reused": True})
        extra = "".join([f", layers {found.layers_gone}" if found.layers_gone else "",
                         f", {len(found.channels_gone)} hidden channels" if found.channels_gone else ""])
        logger.info(f"recovery: {fraction:.0%} of heads and FFN neurons removed{extra}, seed {seed}, "
                    f"{args.max_steps} steps at lr {args.learning_rate:g}"
                    f"{', distilled from the dense model' if opt.distill else ''}")
        start = time.perf_counter()
        trainer = PruningTrainer(model=self.shaped(fraction), args=args, pruning_config=self.recovery_config,
                                 teacher_model=self.dense if opt.distill else None, **trainer_kwargs(self.job_data))
        resume = None
        last = last_complete_checkpoint(args.output_dir)
        if last is not None and self.store.fetch(f"recovery-{arm}-started", record, marker=True) is not None:
            logger.info(f"recovery {arm}: continuing from {last}")
            resume = last
        else:
            self.store.keep(f"recovery-{arm}-started", record, {"output_dir": args.output_dir})
        trainer.train(resume_from_checkpoint=resume)
        result = Recovery(fraction=fraction, seed=seed,
                          validation=_evaluate(trainer, self.data.get("validation"), "validation"),
                          test=_evaluate(trainer, self.data["test"], "test"), seconds=time.perf_counter() - start,
                          model_dir=model_dir)
        self.save_recovered(trainer, result)
        self.store.keep(f"recovery-{arm}", record,
                        {k: v for k, v in result.to_dict().items() if k not in ("model_dir", "reused")})
        logger.info(f"recovery: {fraction:.0%} removed, seed {seed}: validation accuracy "
                    f"{fmt_scores(result.validation)}, test accuracy {fmt_scores(result.test)} ({result.seconds:.0f} s)")
        return result

    def drop_points(self, result: Recovery) -> float:
        return (self.dense_scores["validation"]["accuracy"] - result.validation["accuracy"]) * 100

    # ----------------------------------------------------------------------------------------------- search
    def search(self) -> Search:
        """The least pruning that meets --target_speedup (timed in ONNX Runtime before any training), or the most
        that stays within --max_accuracy_drop (bisection, one recovery per probe)."""
        opt = self.opt
        grid = fraction_grid(opt.fraction_step, opt.max_fraction)
        start = time.perf_counter()
        kept = self.store.fetch("search", self.record("search"))
        if kept is not None:
            tried = [LatencyPoint(**point) for point in kept["tried"]]
            return Search(tried[kept["chosen"]], tried, kept["met"], [Recovery(**r) for r in kept["recoveries"]])
        with LatencyProbe(self.dense, seq_len=self.job_data.max_length, batch_sizes=self.batch_sizes,
                          precision=opt.speedup_precision, rounds=opt.timing_rounds, repeats=opt.timing_repeats,
                          workdir=self.out) as probe:
            if opt.target_speedup is not None:
                goal = opt.target_speedup * (1 + opt.speedup_margin)
                chosen, tried, met = search_least_fraction(lambda f: probe.measure(self.shaped(f), f), grid, goal,
                                                           opt.speedup_batch_size)
                if not met:
                    logger.warning(f"hf_prune optimize: even {chosen.fraction:.0%} of heads and neurons removed times "
                                   f"{chosen.speedup[opt.speedup_batch_size]:.2f}x, short of --target_speedup "
                                   f"{opt.target_speedup}: continuing with that closest shape.")
                found = Search(chosen, tried, met, [])
            else:
                found = self.bisect_accuracy(probe, grid)
        self.store.keep("search", self.record("search"), {
            "tried": [asdict(p) for p in found.tried], "chosen": found.tried.index(found.chosen), "met": found.met,
            "recoveries": [r.to_dict() for r in found.recoveries]})
        self.phases["search_seconds"] = time.perf_counter() - start
        return found

    def bisect_accuracy(self, probe: LatencyProbe, grid: list[float]) -> Search:
        """Most pruning within the accuracy budget: accuracy falls with the fraction removed, so bisect the grid with
        one recovery per probe; every probe is also timed for the report."""
        tried, recoveries, best, low, high = [], [], None, 0, len(grid) - 1
        while low <= high:
            middle = (low + high) // 2
            tried.append(probe.measure(self.shaped(grid[middle]), grid[middle]))
            result = self.recover(grid[middle], self.seeds[0])
            recoveries.append(result)
            if self.drop_points(result) <= self.opt.max_accuracy_drop:
                best, low = result, middle + 1
            else:
                high = middle - 1
        closest = best or min(recoveries, key=self.drop_points)
        chosen = next(p for p in tried if p.fraction == closest.fraction)
        return Search(chosen, tried, best is not None, recoveries)

    def recover_seeds(self, found: Search) -> tuple[Recovery, list[Recovery]]:
        """Recover the chosen shape with every seed (one may be done already); the best on validation is kept."""
        start = time.perf_counter()
        fraction = found.chosen.fraction
        final = [r for r in found.recoveries if r.fraction == fraction]
        for seed in self.seeds:
            if not any(r.seed == seed for r in final):
                result = self.recover(fraction, seed)
                final.append(result)
                found.recoveries.append(result)
        best = max(final, key=lambda r: r.validation["accuracy"]) if self.has_validation else final[0]
        self.phases["recovery_seconds"] = (time.perf_counter() - start
                                           + sum(r.seconds for r in found.recoveries if r not in final))
        return best, final

    @property
    def has_validation(self) -> bool:
        return self.data.get("validation") is not None

    # ----------------------------------------------------------------------------------------------- export
    def export(self, best: Recovery) -> tuple[str, str, Any]:
        """Save the kept model (with a model card) atomically to OUT/model and export it to OUT/onnx."""
        start = time.perf_counter()
        opt, out = self.opt, self.out
        model_dir, onnx_dir = os.path.join(out, "model"), os.path.join(out, "onnx")
        record = {**self.record("recovery", best.fraction, best.seed), "quantize": opt.quantize}
        kept = self.store.fetch("export", record) if os.path.isdir(model_dir) and os.path.isdir(onnx_dir) else None
        if kept is not None:
            return model_dir, onnx_dir, ExportResult(**kept)
        with staged_directory(model_dir) as staging:
            for name in os.listdir(best.model_dir):
                if os.path.isfile(os.path.join(best.model_dir, name)):
                    shutil.copy2(os.path.join(best.model_dir, name), staging)
        exported = export_onnx(model_dir, onnx_dir, optimize=None, quantize=opt.quantize, overwrite=True)
        self.store.keep("export", record, json.loads(json.dumps(asdict(exported), default=_plain)))
        self.phases["export_seconds"] = time.perf_counter() - start
        return model_dir, onnx_dir, exported

    def save_recovered(self, trainer: PruningTrainer, result: Recovery) -> None:
        """The recovered model with its model card (training log, and the test results next to the dense model's),
        written whole or not at all: what `export` copies to OUT/model when this recovery is the one kept."""
        opt, data, out = self.opt, self.data, self.out
        with staged_directory(result.model_dir) as staging:
            trainer.save_model(staging)
            add_results_to_model_card(trainer, {"dense (the model optimized)": self.dense_scores["test"],
                                                "this model": result.test},
                                      f"the test split ({len(data['test'])} examples; {self.job_data.description})")
            kept_dir, trainer.args.output_dir = trainer.args.output_dir, staging  # the card goes to args.output_dir
            try:
                trainer.create_model_card(model_name=os.path.basename(os.path.abspath(out)),
                                          finetuned_from=opt.model_name_or_path, dataset=self.job_data.description,
                                          tasks="text-classification")
            finally:
                trainer.args.output_dir = kept_dir

    # -------------------------------------------------------------------------------------------- benchmark
    def benchmark(self, model_dir: str, onnx_dir: str) -> tuple[Any, dict[str, Any]]:
        """Dense against the result in ONNX Runtime on this machine, accuracy on the test split."""
        start = time.perf_counter()
        opt, data, job_data = self.opt, self.data, self.job_data
        bench_args = BenchmarkArguments(
            checkpoints=[resolve_directory(opt.model_name_or_path), model_dir], names=["dense", "optimized"],
            output_dir=os.path.join(self.out, "benchmark"), batch_sizes=self.batch_sizes, seq_len=job_data.max_length,
            rounds=opt.benchmark_rounds, repeats=opt.benchmark_repeats, eval_size=len(data["test"]),
            text_columns=job_data.classes.text_columns, label_column="label", int8=opt.quantize is not None,
            runtimes=["onnxruntime"], optimize=None, exports=[None, onnx_dir],
        )
        results = run_benchmark(bench_args, eval_dataset=_raw_test(job_data), tokenizer=job_data.tokenizer,
                                eval_name=f"test split ({job_data.description})")
        self.phases["benchmark_seconds"] = time.perf_counter() - start
        return bench_args, results

    # ----------------------------------------------------------------------------------------------- report
    def target(self, best: Recovery, found: Search, benchmark: dict[str, Any]) -> dict[str, Any]:
        """The target and whether the result meets it, as measured in the final benchmark."""
        opt = self.opt
        precision = "int8" if opt.speedup_precision == "int8" else "fp32"
        row = next(r for r in benchmark["rows"] if r["name"] == "optimized" and r["precision"] == precision)
        achieved = row[f"speedup_b{opt.speedup_batch_size}"]
        target: dict[str, Any] = {"speedup": opt.target_speedup, "max_accuracy_drop": opt.max_accuracy_drop,
                                  "speedup_precision": precision, "speedup_batch_size": opt.speedup_batch_size,
                                  "achieved_speedup": achieved}
        if opt.target_speedup is not None:
            target["speedup_met"] = achieved >= opt.target_speedup
        if opt.max_accuracy_drop is not None:
            drop = self.drop_points(best)
            target["validation_drop_points"] = drop
            target["accuracy_met"] = found.met if opt.target_speedup is None else drop <= opt.max_accuracy_drop
        target["met"] = all(v for k, v in target.items() if k.endswith("_met"))
        return target

    def report(self, best: Recovery, final: list[Recovery], found: Search, exported: Any, bench_args: Any,
               benchmark: dict[str, Any], model_dir: str, onnx_dir: str) -> dict[str, Any]:
        summary = structure_summary(load_pruned(model_dir))
        job_data, opt = self.job_data, self.opt
        return {
            "target": self.target(best, found, benchmark),
            "chosen": {"fraction_removed": found.chosen.fraction, "heads_per_layer": summary["heads_per_layer"],
                       "intermediate_sizes": summary["intermediate_sizes"],
                       "layers_removed": self.importance.layers_gone, "num_layers": summary["num_layers"],
                       "hidden_size": summary["hidden_size"], "original_hidden_size": summary["original_hidden_size"],
                       "seed": best.seed, "selected_by": "validation accuracy" if self.has_validation else
                       "first seed (no validation split)"},
            "dense": self.dense_scores,
            "candidates": [p.to_dict() for p in found.tried],
            "recoveries": [r.to_dict() for r in found.recoveries],
            "seeds": seed_summary(final, self.dense_scores),
            "benchmark": benchmark["rows"],
            "export": {"files": exported.files, "sizes_bytes": exported.sizes_bytes,
                       "max_abs_diff": exported.max_abs_diff},
            "outputs": {"model": model_dir, "onnx": onnx_dir, "benchmark": bench_args.output_dir},
            "data": {"description": job_data.description, "label_names": job_data.label_names,
                     "examples": job_data.classes.num_examples(), "max_length": job_data.max_length},
            "settings": {"optimize": asdict(opt), "pruning_config": self.recovery_config.to_dict(),
                         "training_arguments": json.loads(self.training_args.to_json_string()),
                         "threads": benchmark["settings"]["threads"],
                         "onnxruntime": benchmark["settings"].get("onnxruntime"), "torch": torch.__version__},
            "phases": self.phases,
            "phases_reused": self.store.reused,
        }


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
    wall = time.perf_counter()
    validate_optimize(opt, pruning_config)  # options first: nothing is loaded for a typo
    opt = dataclasses.replace(opt, importance=opt.importance or "gradient")
    require_onnx()
    if job_data is None:
        job_data = JobData(JobArguments(model_name_or_path=opt.model_name_or_path), data_args, splits, sources)
    validate_data(opt, job_data)
    os.makedirs(training_args.output_dir, exist_ok=True)
    run = OptimizeRun(opt, pruning_config, training_args, job_data)
    run.score()
    found = run.search()
    best, final = run.recover_seeds(found)
    model_dir, onnx_dir, exported = run.export(best)
    bench_args, benchmark = run.benchmark(model_dir, onnx_dir)
    report = run.report(best, final, found, exported, bench_args, benchmark, model_dir, onnx_dir)
    report["wall_seconds"] = time.perf_counter() - wall
    write_report(report, training_args.output_dir, benchmark)
    return report


# ------------------------------------------------------------------------------------------------ command line
NAME = "optimize"


@dataclass
class OptimizeTrainingArguments(with_defaults(TrainTrainingArguments, {
    "output_dir": "outputs/optimize", "max_steps": 500, "learning_rate": 3e-4})):
    """`hf-prune train`'s training defaults with a recovery budget and step size that won back heavy structured
    pruning on the packaged MiniLM (benchmarks/results/structured_seeds.md)."""


@dataclass
class OptimizePruningConfig(with_defaults(PruningConfig, {"target_sparsity": 0.0, "distillation_alpha": 0.9}, {
        "target_sparsity": "Unstructured sparsity added to the remaining matrices during recovery (scattered zeros: a "
        "smaller file, no speedup on CPU). (default: 0)"})):
    """`PruningConfig` for the recovery: no unstructured sparsity unless asked, distillation weighted towards the
    teacher."""


@dataclass
class OptimizeDataArguments(TrainDataArguments):
    """The data options of `hf-prune train`, and plain text files for a causal LM (`.txt`: documents separated by
    blank lines); a classifier's data is still refused as .txt when it is loaded."""

    file_types = (*TrainDataArguments.file_types, ".txt")


class OptimizeCommandArguments(NamedTuple):
    """What `parse_args` returns: the four option groups of `hf-prune optimize`."""

    optimize: OptimizeArguments
    data: DataArguments
    pruning: PruningConfig
    training: TrainingArguments


CLASSES = (OptimizeArguments, OptimizeDataArguments, OptimizePruningConfig, OptimizeTrainingArguments)


def make_parser() -> CommandParser:
    return CommandParser(
        CLASSES,
        prog="hf-prune optimize",
        description="Make a fine-tuned classifier faster for ONNX Runtime, aimed at a target: score its attention "
        "heads and FFN neurons, time candidate shapes in ONNX Runtime before any training and keep the least pruning "
        "that meets --target_speedup (or, with --max_accuracy_drop alone, the most that stays within it on the "
        "validation split), remove them, recover with a fine-tune distilled from the model (--max_steps is its "
        "budget, once per --recovery_seeds seed), export to ONNX (INT8 with --quantize dynamic), benchmark dense vs "
        "result, and write OUTPUT_DIR/model (load_pruned), OUTPUT_DIR/onnx (create_session) and "
        "OUTPUT_DIR/report.{md,json,png}. Data and training options are those of hf-prune train.",
        epilog="Defaults shown are those of hf-prune optimize: hf-prune train's recipe defaults with max_steps 500, "
        "learning_rate 3e-4, distillation_alpha 0.9, target_sparsity 0 (no unstructured sparsity) and output_dir "
        "outputs/optimize; with --config FILE, the values from FILE. Flags override the file.",
        helps={
            "--model_name_or_path": "Fine-tuned sequence-classification model (folder or Hub id): the dense "
            "baseline, the distillation teacher and the model that is pruned. (default: none; required)",
            "--dataset_name": PACKAGED_DATA_HELP,
            "--head_sparsity": "Not used by optimize: the target decides the fractions. (default: 0)",
            "--neuron_sparsity": "Not used by optimize: the target decides the fractions. (default: 0)",
            "--no_distill": "Recover without distillation from the dense model. (default: distill)",
        },
    )


def parse_args(argv: Sequence[str]) -> OptimizeCommandArguments:
    """(OptimizeArguments, DataArguments, PruningConfig, TrainingArguments) of `hf-prune optimize`, from an optional
    `--config` YAML file overridden by command-line flags."""
    return OptimizeCommandArguments(*parse_command(argv, CLASSES, make_parser, NAME))


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
        if is_language_model(args.optimize):
            return main_lm(args)
        splits, sources = (None, None) if args.data.has_source else packaged_splits(NAME)
        show_progress("hf_prune.commands.optimize")
        # run_optimize checks the options, then loads and checks the data, before any model is scored or trained.
        with hold_output_dir(args.training.output_dir):
            report = run_optimize(args.optimize, args.data, args.pruning, args.training, splits=splits,
                                  sources=sources)
    except (ValueError, OSError, ImportError) as err:
        raise SystemExit(f"hf-prune optimize: {err}") from None
    print()
    print(format_report(report))
    print(f"Report: {args.training.output_dir}/report.md, report.json, report.png")
    return 0


def is_language_model(opt: OptimizeArguments) -> bool:
    """Whether this run optimizes a causal LM: `--task`, else the model's config."""
    if opt.task != "auto":
        return opt.task == "causal-lm"
    return bool(opt.model_name_or_path) and is_causal_lm(opt.model_name_or_path)


def main_lm(args: OptimizeCommandArguments) -> int:
    try:
        if not args.optimize.model_name_or_path:
            raise ValueError("--model_name_or_path is not set: give the causal LM to optimize (a folder or Hub id).")
        show_progress("hf_prune.commands.optimize_lm")
        if args.training.process_index != 0:  # one process tells the progress of a distributed run
            logging.get_logger("hf_prune.commands.optimize_lm").setLevel(args.training.get_process_log_level())
        with hold_output_dir(args.training.output_dir):
            report = run_optimize_lm(args.optimize, args.data, args.pruning, args.training)
    except (ValueError, OSError, ImportError) as err:
        raise SystemExit(f"hf-prune optimize: {err}") from None
    if not report:  # not process 0 of a distributed run: it wrote and reports nothing
        return 0
    print()
    print(format_lm_report(report))
    print(f"Report: {args.training.output_dir}/report.md, report.json, report.png")
    return 0
