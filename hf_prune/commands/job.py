"""The main job: fine-tune a dense baseline and a pruned model side by side on labelled text-classification data,
and compare them.

Both arms start from the same pretrained weights with the same seed, data order and number of steps, so the table
they produce isolates what pruning costs. The dense arm doubles as the distillation teacher of the pruned arm. The
data is any Hub dataset or local files (`hf_prune.data.DataArguments`), the model any checkpoint that
`AutoModelForSequenceClassification` loads, and every `TrainingArguments` field applies to both arms; each arm
writes under its own folder (`output_dir/dense`, `output_dir/pruned`).

    from transformers import TrainingArguments
    from hf_prune import PruningConfig
    from hf_prune.data import DataArguments
    from hf_prune.commands.job import JobArguments, run_job

    results = run_job(
        JobArguments(model_name_or_path="bert-base-uncased", pruning_learning_rate=1e-3),
        DataArguments(train_file="reviews.csv", text_columns="review", label_column="stars"),
        PruningConfig(target_sparsity=0.9),
        TrainingArguments(output_dir="outputs/reviews", max_steps=1000, learning_rate=1e-4),
    )
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import datasets
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from ..config import PruningConfig
from ..data import ClassificationData, DataArguments, load_classification_data
from ..files import atomic_write_text, last_complete_checkpoint
from ..finalize import add_results_to_model_card
from ..masks import config_sparsity_report
from ..metrics import compute_metrics
from ..plot import plot_training
from ..trainer import PruningTrainer
from .markdown import table
from .parsing import ModelArguments, from_pretrained_option
from .phases import PhaseStore, dataset_identity, identity, training_record

logger = logging.get_logger(__name__)

ARMS = ("dense", "pruned")


@dataclass
class JobArguments(ModelArguments):
    """What the job compares: the model, and how the pruned arm differs from the dense one."""

    _argument_group_name = "job"  # HfArgumentParser groups these options under this title in --help

    pruning_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the pruned arm (default: learning_rate). Heavily pruned networks recover "
            "faster with a larger step than dense fine-tuning needs."
        },
    )
    distill: bool = field(default=True, metadata={"help": "Distil the pruned arm from the fine-tuned dense arm."})
    teacher_path: Optional[str] = field(
        default=None,
        metadata={"help": "Reuse an already fine-tuned dense model (folder) as baseline and teacher: no dense arm."},
    )
    prune_from_dense: bool = field(
        default=False,
        metadata={
            "help": "Start the pruned arm from the fine-tuned dense weights (prune a fine-tuned model, the usual "
            "production case) instead of the pretrained ones. Its steps then come on top of the dense arm's."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose classification head has another number of labels than the data "
                  "(the head is then initialised anew)."},
    )
    dense_only: bool = field(
        default=False,
        metadata={"help": "Fine-tune and score the dense arm only (a baseline, or the fine-tuned model `hf-prune "
                  "optimize` starts from); no pruned arm."},
    )

    resume_phases: bool = field(
        default=True,
        metadata={"help": "Continue a killed run of the same command: reuse the dense arm it finished (kept in "
                  "OUT/phases with the options and data that made it) and continue the pruned arm from its last "
                  "Trainer checkpoint (with --save_strategy steps). A phase made by other options or data is refused "
                  "with the difference named; false starts over."},
    )

    def __post_init__(self) -> None:
        value = self.pruning_learning_rate
        if value is not None and value <= 0:
            raise ValueError(f"--pruning_learning_rate {value!r} is invalid: must be > 0.")
        if self.dense_only and self.teacher_path:
            raise ValueError("--dense_only fine-tunes the dense arm, --teacher_path reuses one instead of training "
                             "it: give one of them.")


def _write_results(results: dict, output_dir: str) -> None:
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(output_dir, "results.md"), format_results(results))
    logger.info(f"results: {os.path.join(output_dir, 'results.json')}, {os.path.join(output_dir, 'results.md')}")


# ------------------------------------------------------------------------------------------------ arms
def arm_training_arguments(
    args: TrainingArguments, arm: str, learning_rate: Optional[float] = None, seed: Optional[int] = None
) -> TrainingArguments:
    """The user's TrainingArguments for one arm: `output_dir/<arm>`, `hub_model_id` suffixed `-<arm>` when pushing,
    the arm's learning rate and seed; the data order (`data_seed`) is the same for every arm."""
    arm_dir = os.path.join(args.output_dir, arm)
    changes: dict[str, Any] = {"output_dir": arm_dir}
    if learning_rate is not None:
        changes["learning_rate"] = learning_rate
    if seed is not None:
        changes["seed"] = changes["data_seed"] = seed
    elif args.data_seed is None:
        changes["data_seed"] = args.seed  # both arms see the batches in the same order
    if args.push_to_hub:
        changes["hub_model_id"] = f"{args.hub_model_id or Path(args.output_dir).resolve().name}-{arm}"
    if getattr(args, "logging_dir", None):  # Transformers 4.x: one TensorBoard folder per arm
        changes["logging_dir"] = os.path.join(args.logging_dir, arm)
    run_name = getattr(args, "run_name", None)
    if run_name:
        changes["run_name"] = arm_dir if run_name == args.output_dir else f"{run_name}-{arm}"
    return dataclasses.replace(args, **changes)


def _steps_text(args: TrainingArguments) -> str:
    return f"{args.max_steps} steps" if args.max_steps and args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"


def _pruning_text(config: PruningConfig) -> str:
    parts = []
    if config.target_sparsity > 0:
        parts.append(f"{config.method} pruning to {config.target_sparsity:.0%} of the targeted weights "
                     f"({config.granularity}, {config.schedule} schedule)")
    if config.head_sparsity > 0:
        parts.append(f"{config.head_sparsity:.0%} of attention heads removed")
    if config.neuron_sparsity > 0:
        parts.append(f"{config.neuron_sparsity:.0%} of FFN neurons removed")
    return ", ".join(parts) or "no pruning (target_sparsity 0)"


# ------------------------------------------------------------------------------------------------ data and models
class JobData:
    """The checked data, tokenizer and tokenized splits of a job, loaded once and shared by all arms.

    The data is loaded and checked first (labels, columns, splits), then the tokenizer and the model config, all
    before any model weights are loaded.
    """

    def __init__(
        self,
        job: JobArguments,
        data_args: DataArguments,
        splits: Optional[Mapping[str, datasets.Dataset]] = None,
        sources: Union[None, str, Mapping[str, str]] = None,
    ) -> None:
        if not job.model_name_or_path:
            raise ValueError("--model_name_or_path is not set: give a model folder or Hub id.")
        self.model_path = job.model_name_or_path
        self.models_loaded = 0
        self.ignore_mismatched_sizes = job.ignore_mismatched_sizes
        self.data_args = data_args
        self.classes: ClassificationData = load_classification_data(data_args, splits, sources)
        self.label_config = self.classes.label_config()
        self.tokenizer = from_pretrained_option(AutoTokenizer, self.model_path, "model_name_or_path")
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"--model_name_or_path {self.model_path!r}: its tokenizer has neither a pad nor an "
                                 "end-of-sequence token to pad with.")
            self.tokenizer.pad_token = self.tokenizer.eos_token  # decoder-only models (GPT-2, Llama) pad with EOS
        self.max_length = data_args.max_length
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if model_max and model_max < self.max_length:
            logger.warning(f"hf_prune: --max_length {self.max_length} exceeds what the tokenizer of "
                           f"{self.model_path} allows ({model_max}); using {model_max}.")
            self.max_length = model_max
        config = AutoConfig.from_pretrained(self.model_path)
        has_head = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
        if has_head and config.num_labels != self.classes.num_labels and not self.ignore_mismatched_sizes:
            raise ValueError(f"--model_name_or_path {self.model_path!r} is a classifier with num_labels="
                             f"{config.num_labels} but the data has {self.classes.num_labels} labels "
                             f"{self.label_names}; pass --ignore_mismatched_sizes to replace its head.")
        positions = getattr(config, "max_position_embeddings", None)
        if positions and positions < self.max_length:
            raise ValueError(f"--max_length {self.max_length} is more than {self.model_path} has position embeddings "
                             f"for ({positions}); pass --max_length {positions} or less.")
        self.data = self.classes.tokenize(self.tokenizer, self.max_length)

    @property
    def label_names(self) -> list[str]:
        return self.classes.label_names

    @property
    def description(self) -> str:
        return self.classes.description

    def fresh_model(self, seed: int, path: Optional[str] = None):
        """The model with a classification head for the data's labels, its new weights initialised from `seed`."""
        set_seed(seed)
        # Transformers warns that the new head is "newly initialized" at every load: once per job is enough.
        verbosity = logging.get_verbosity()
        if self.models_loaded:
            logging.set_verbosity_error()
        try:
            # id2label/label2id only: num_labels follows from them (passing both makes Transformers 5 warn).
            model = AutoModelForSequenceClassification.from_pretrained(
                path or self.model_path, ignore_mismatched_sizes=self.ignore_mismatched_sizes,
                id2label=self.label_config["id2label"], label2id=self.label_config["label2id"],
            )
        finally:
            logging.set_verbosity(verbosity)
        self.models_loaded += 1
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model


def validate_job(job: JobArguments, training_args: TrainingArguments, job_data: JobData) -> None:
    """Refuse, before any training, what the job cannot do with these arguments and this data."""
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no" and job_data.data.get("validation") is None:
        raise ValueError(f"--eval_strategy {strategy} needs a validation split: give --validation_file, a Hub dataset "
                         "with one (--validation_split_name), or --validation_size to carve one from train.")
    if getattr(training_args, "resume_from_checkpoint", None):
        raise ValueError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint!r}: the two-arm job does "
                         "not resume; resume an arm with PruningTrainer.train(resume_from_checkpoint=...) instead.")
    if job.teacher_path:
        config = from_pretrained_option(AutoConfig, job.teacher_path, "teacher_path")
        names = job_data.label_names
        if config.num_labels != len(names):
            raise ValueError(f"--teacher_path {job.teacher_path!r} has num_labels={config.num_labels} but the data "
                             f"has {len(names)} labels {names}.")
        teacher_names = [str(config.id2label[i]) for i in range(config.num_labels)]
        if teacher_names != [f"LABEL_{i}" for i in range(len(names))] and teacher_names != names:
            raise ValueError(f"--teacher_path {job.teacher_path!r} has the labels {teacher_names} but the data has "
                             f"{names} (label ids must mean the same classes).")


def score_arm(trainer: Trainer, test: datasets.Dataset, pruning_config: PruningConfig, seconds: float) -> dict[str, Any]:
    """Test-split accuracy and macro-F1, measured sparsity of the targeted layers, non-zero parameters, time."""
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    report = config_sparsity_report(trainer.model, pruning_config)
    return {
        "accuracy": metrics["test_accuracy"],
        "macro_f1": metrics["test_macro_f1"],
        "sparsity": report["global_sparsity"],
        "nonzero_params": report["model_params"] - report["model_zero_params"],
        "params": report["model_params"],
        "train_seconds": seconds,
    }


def trainer_kwargs(job_data: JobData) -> dict[str, Any]:
    """Trainer keyword arguments for the job's data: train/eval splits, metrics, tokenizer, collator."""
    return {
        "train_dataset": job_data.data["train"],
        "eval_dataset": job_data.data.get("validation"),
        "compute_metrics": compute_metrics,
        "processing_class": job_data.tokenizer,  # saved with every checkpoint and pushed with the model
        "data_collator": default_data_collator,  # inputs are already padded to max_length
    }


def train_dense(job_data: JobData, args: TrainingArguments, seed: Optional[int] = None) -> Trainer:
    """Fine-tune the dense model with `args` (one arm's arguments) and return its Trainer."""
    trainer = Trainer(model=job_data.fresh_model(args.seed if seed is None else seed), args=args,
                      **trainer_kwargs(job_data))
    trainer.train()
    return trainer


def _finish_arm(trainer: Trainer, arm: str, job_data: JobData, arms: dict[str, dict[str, Any]]) -> None:
    """Save the arm and its model card: Trainer's fields (base model, data, task) and the test results of both arms."""
    rows = {("this model" if name == arm else f"{name} arm (same data, seed and steps)"): scores
            for name, scores in arms.items()}
    add_results_to_model_card(trainer, rows, f"the test split ({len(job_data.data['test'])} examples; "
                              f"{job_data.description})")
    trainer.save_model()
    # Trainer's own model card fields: base model, data, task (PruningTrainer adds its pruning section).
    card = {"finetuned_from": job_data.model_path, "dataset": job_data.description, "tasks": "text-classification"}
    if trainer.args.push_to_hub:
        logger.info(f"{arm} arm: pushing to the Hub as {trainer.args.hub_model_id}")
        trainer.push_to_hub(commit_message=f"hf-prune {arm} arm", **card)
    elif trainer.is_world_process_zero():
        trainer.create_model_card(model_name=Path(trainer.args.output_dir).name, **card)


def write_plots(trainer: PruningTrainer, pruning_config: PruningConfig, output_dir: str) -> dict[str, str]:
    """`schedule.png` (the pruned arm's sparsity over its steps, with eval accuracy where logged) and
    `layer_sparsity.png` (the pruned model per layer and module type) in `output_dir`, with matplotlib."""
    if not trainer.is_world_process_zero():
        return {}
    report = config_sparsity_report(trainer.model, pruning_config)
    return plot_training(trainer.state.log_history, report, output_dir)


def run_job(
    job: JobArguments,
    data_args: DataArguments,
    pruning_config: PruningConfig,
    training_args: TrainingArguments,
    splits: Optional[Mapping[str, datasets.Dataset]] = None,
    sources: Union[None, str, Mapping[str, str]] = None,
    job_data: Optional[JobData] = None,
) -> dict[str, Any]:
    """Train the dense and the pruned arm, score both on the test split, save both models and the results.

    Args:
        job, data_args, pruning_config, training_args: the four groups of options (`hf-prune train` parses them).
        splits, sources: ready splits instead of `data_args`' source, and where they came from (see
            `hf_prune.data.load_raw_splits`).
        job_data: data already loaded with these arguments (then `splits` and `sources` are not used).

    Returns:
        A dict with `data` (description, label names, examples per split), the options, and one entry per arm
        under `arms` (`accuracy`, `macro_f1`, `sparsity`, `nonzero_params`, `params`, `train_seconds`). The same goes
        to `output_dir/results.json`, and a table to `output_dir/results.md`; with matplotlib, the pruned arm's
        `schedule.png` and `layer_sparsity.png` go beside them (`write_plots`).
    """
    job_data = job_data if job_data is not None else JobData(job, data_args, splits, sources)
    validate_job(job, training_args, job_data)
    data = job_data.data
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    results: dict[str, Any] = {
        "data": {
            "description": job_data.description,
            "sources": job_data.classes.sources,
            "label_names": job_data.label_names,
            "text_columns": job_data.classes.text_columns,
            "examples": job_data.classes.num_examples(),
            "max_length": job_data.max_length,
        },
        "job": asdict(job),
        "data_arguments": asdict(data_args),
        "pruning_config": pruning_config.to_dict(),
        "training_arguments": json.loads(training_args.to_json_string()),
        "arms": {},
    }
    logger.info(f"data: {job_data.description}; labels {job_data.label_names}")

    dense_args = arm_training_arguments(training_args, "dense")
    # Finished arms kept in OUT/phases with what produced them: a rerun of the same command continues.
    store = PhaseStore(output_dir, enabled=job.resume_phases)
    inputs = {"model": identity(job_data.model_path), "labels": job_data.label_names,
              **{f"data.{name}": dataset_identity(split) for name, split in data.items()}}
    dense_record = {**inputs, **training_record(dense_args)}
    kept_dense = None
    if not job.teacher_path and os.path.isfile(os.path.join(dense_args.output_dir, "config.json")):
        kept_dense = store.fetch("dense", dense_record)
    if kept_dense is not None:
        logger.info(f"dense arm: reusing the one a previous run of this command finished in {dense_args.output_dir}")
        dense = AutoModelForSequenceClassification.from_pretrained(dense_args.output_dir)
        dense_trainer = Trainer(model=dense, args=dataclasses.replace(dense_args, push_to_hub=False),
                                compute_metrics=compute_metrics, data_collator=default_data_collator)
        results["arms"]["dense"] = kept_dense
    elif job.teacher_path:
        logger.info(f"dense arm: scoring the fine-tuned teacher {job.teacher_path} (no dense training)")
        dense = AutoModelForSequenceClassification.from_pretrained(job.teacher_path)
        dense_trainer = Trainer(model=dense, args=dataclasses.replace(dense_args, push_to_hub=False),
                                compute_metrics=compute_metrics, data_collator=default_data_collator)
        results["arms"]["dense"] = score_arm(dense_trainer, data["test"], pruning_config, float("nan"))
    else:
        logger.info(f"dense arm: fine-tuning {job_data.model_path} for {_steps_text(dense_args)} on "
                     f"{len(data['train'])} examples (lr {dense_args.learning_rate:g}) into {dense_args.output_dir}")
        start = time.perf_counter()
        dense_trainer = train_dense(job_data, dense_args)
        seconds = time.perf_counter() - start
        logger.info(f"dense arm: scoring on the test split ({len(data['test'])} examples)")
        results["arms"]["dense"] = score_arm(dense_trainer, data["test"], pruning_config, seconds)
        _finish_arm(dense_trainer, "dense", job_data, results["arms"])
        if dense_trainer.is_world_process_zero():
            store.keep("dense", dense_record, results["arms"]["dense"])
    if job.dense_only:
        _write_results(results, output_dir)
        return results

    pruned_args = arm_training_arguments(training_args, "pruned", learning_rate=job.pruning_learning_rate)
    start_from = (job.teacher_path or dense_args.output_dir) if job.prune_from_dense else None
    teacher = dense_trainer.model if job.distill else None
    logger.info(f"pruned arm: fine-tuning {start_from or job_data.model_path} with {_pruning_text(pruning_config)} "
                f"for {_steps_text(pruned_args)} (lr {pruned_args.learning_rate:g}"
                f"{', distilled from the dense arm' if teacher is not None else ''}) into {pruned_args.output_dir}")
    trainer = PruningTrainer(
        model=job_data.fresh_model(pruned_args.seed, start_from),
        args=pruned_args,
        pruning_config=pruning_config,
        teacher_model=teacher,
        **trainer_kwargs(job_data),
    )
    # The pruned arm continues from its last checkpoint when the checkpoints are this command's (same options,
    # data and dense arm); the marker is written before its first step.
    pruned_record = {**inputs, **training_record(pruned_args), "pruning_config": pruning_config.to_dict(),
                     "distill": job.distill, "prune_from_dense": job.prune_from_dense,
                     "teacher": identity(job.teacher_path) if job.teacher_path else dense_record}
    last = last_complete_checkpoint(pruned_args.output_dir)
    resume = None
    if last is not None and store.fetch("pruned-started", pruned_record, marker=True) is not None:
        logger.info(f"pruned arm: continuing from {last}")
        resume = last
    elif trainer.is_world_process_zero():
        store.keep("pruned-started", pruned_record, {"output_dir": pruned_args.output_dir})
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    logger.info(f"pruned arm: scoring on the test split ({len(data['test'])} examples)")
    results["arms"]["pruned"] = score_arm(trainer, data["test"], pruning_config, seconds)
    _finish_arm(trainer, "pruned", job_data, results["arms"])

    results["phases_reused"] = store.reused + (["pruned (from its last checkpoint)"] if resume else [])
    _write_results(results, output_dir)
    for path in write_plots(trainer, pruning_config, output_dir).values():
        logger.info(f"plot: {path}")
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the arms: accuracy, macro-F1, sparsity of the pruned layers, parameters, time."""
    dense_acc = results["arms"].get("dense", {}).get("accuracy")
    rows = []
    for name, arm in results["arms"].items():
        relative = f" ({arm['accuracy'] / dense_acc:.1%} of dense)" if dense_acc and name != "dense" else ""
        rows.append([name, f"{arm['accuracy']:.4f}{relative}", f"{arm['macro_f1']:.4f}", f"{arm['sparsity']:.2%}",
                     f"{arm['nonzero_params']:,} / {arm['params']:,}", f"{arm['train_seconds']:.0f}"])
    header = ["arm", "accuracy", "macro-F1", "sparsity (pruned layers)", "non-zero params", "train time (s)"]
    return "\n".join(table(header, rows))


def format_results(results: dict[str, Any]) -> str:
    """results.md: the data (where each split came from, the labels), then the table of the arms."""
    lines = []
    data = results.get("data")
    if data:
        examples = ", ".join(f"{n} {split}" for split, n in data["examples"].items())
        lines += [f"Data: {data['description']} ({examples} examples).",
                  f"Labels: {', '.join(data['label_names'])}.", ""]
    return "\n".join(lines + [format_table(results)]) + "\n"
