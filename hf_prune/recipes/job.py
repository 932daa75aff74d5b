"""The main job: fine-tune a dense baseline and a pruned model side by side, and compare them.

Both arms start from the same pretrained weights with the same seed, data order and number of steps, so the table
they produce isolates what pruning costs. The dense arm doubles as the distillation teacher of the pruned arm.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from .. import PruningConfig, PruningTrainer, sparsity_report
from ..metrics import compute_metrics

logger = logging.get_logger(__name__)


@dataclass
class JobArguments:
    """What to train on and for how long. The defaults use the packaged MiniLM and tweet sentiment data."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Model folder or Hub id; default: the packaged all-MiniLM-L6-v2."}
    )
    output_dir: str = field(default="outputs/main", metadata={"help": "Where models, results.json and results.md go."})
    max_steps: int = field(default=250, metadata={"help": "Optimizer steps of each arm (dense and pruned)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of both arms (linear decay)."})
    pruning_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the pruned arm (default: learning_rate). Heavily pruned networks recover "
            "faster with a larger step than dense fine-tuning needs."
        },
    )
    warmup_ratio: float = field(default=0.06, metadata={"help": "Learning-rate warm-up as a fraction of max_steps."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    max_length: int = field(default=64, metadata={"help": "Tokens per example (tweets average ~16 words)."})
    train_size: Optional[int] = field(default=None, metadata={"help": "Cap on training examples (default: all)."})
    eval_size: int = field(default=2000, metadata={"help": "Examples in the test split used for the final scores."})
    seed: int = field(default=42, metadata={"help": "Seed of model initialisation and data order (the split is fixed)."})
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
    logging_steps: int = field(default=25, metadata={"help": "Log loss and sparsity every N steps."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"JobArguments.{name}={getattr(self, name)!r} is invalid: must be a positive integer.")
        for name in ("learning_rate", "pruning_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"JobArguments.{name}={value!r} is invalid: must be > 0.")


def training_arguments(
    job: JobArguments, output_dir: str, seed: Optional[int] = None, pruned: bool = False
) -> TrainingArguments:
    """The TrainingArguments every arm shares, so arms differ only in what they are meant to compare."""
    seed = job.seed if seed is None else seed
    learning_rate = job.pruning_learning_rate if pruned and job.pruning_learning_rate else job.learning_rate
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=job.max_steps,
        learning_rate=learning_rate,
        # Whole steps: Transformers 5 dropped `warmup_ratio`, and 4.x takes only integers as `warmup_steps`.
        warmup_steps=int(round(job.warmup_ratio * job.max_steps)),
        per_device_train_batch_size=job.per_device_train_batch_size,
        per_device_eval_batch_size=job.per_device_eval_batch_size,
        logging_steps=job.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=job.use_cpu,
        dataloader_num_workers=0,
    )


class JobData:
    """Model path, tokenizer and tokenized fixed split of a job, loaded once and shared by all arms."""

    def __init__(self, job: JobArguments) -> None:
        from .packaged import LABELS, load_sentiment_splits, packaged_model_path, tokenize_splits

        self.model_path = job.model_name_or_path or packaged_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        splits = load_sentiment_splits(seed=42, test_size=job.eval_size, train_size=job.train_size)
        self.data = tokenize_splits(splits, self.tokenizer, max_length=job.max_length)
        self.label_kwargs = {
            "num_labels": len(LABELS),
            "id2label": dict(enumerate(LABELS)),
            "label2id": {label: i for i, label in enumerate(LABELS)},
        }

    def fresh_model(self, seed: int, path: Optional[str] = None):
        set_seed(seed)  # the new classifier head is initialised from this seed
        return AutoModelForSequenceClassification.from_pretrained(path or self.model_path, **self.label_kwargs)


def score_arm(trainer: Trainer, data, pruning_config: PruningConfig, seconds: float) -> dict[str, Any]:
    """Test-split accuracy and macro-F1, measured sparsity of the targeted layers, non-zero parameters, time."""
    metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
    report = sparsity_report(trainer.model, pruning_config.targets, pruning_config.exclude)
    return {
        "accuracy": metrics["test_accuracy"],
        "macro_f1": metrics["test_macro_f1"],
        "sparsity": report["global_sparsity"],
        "nonzero_params": report["model_params"] - report["model_zero_params"],
        "params": report["model_params"],
        "train_seconds": seconds,
    }


def train_dense(job: JobArguments, job_data: JobData, output_dir: str, seed: Optional[int] = None) -> Trainer:
    seed = job.seed if seed is None else seed
    trainer = Trainer(
        model=job_data.fresh_model(seed),
        args=training_arguments(job, output_dir, seed),
        train_dataset=job_data.data["train"],
        compute_metrics=compute_metrics,
    )
    trainer.train()
    return trainer


def run_job(job: JobArguments, pruning_config: PruningConfig) -> dict[str, Any]:
    """Train the dense and the pruned arm, score both on the test split, save the pruned model and the results.

    Returns a dict with one entry per arm (`accuracy`, `macro_f1`, `sparsity`, `nonzero_params`, `train_seconds`).
    """
    job_data = JobData(job)
    data = job_data.data
    os.makedirs(job.output_dir, exist_ok=True)
    results: dict[str, Any] = {"job": asdict(job), "pruning_config": pruning_config.to_dict(), "arms": {}}

    dense_dir = os.path.join(job.output_dir, "dense")
    if job.teacher_path:
        dense = AutoModelForSequenceClassification.from_pretrained(job.teacher_path)
        dense_trainer = Trainer(model=dense, args=training_arguments(job, dense_dir), compute_metrics=compute_metrics)
        results["arms"]["dense"] = score_arm(dense_trainer, data, pruning_config, float("nan"))
    else:
        start = time.perf_counter()
        dense_trainer = train_dense(job, job_data, dense_dir)
        results["arms"]["dense"] = score_arm(dense_trainer, data, pruning_config, time.perf_counter() - start)
        dense_trainer.save_model()
        job_data.tokenizer.save_pretrained(dense_dir)

    pruned_dir = os.path.join(job.output_dir, "pruned")
    start_from = (job.teacher_path or dense_dir) if job.prune_from_dense else None
    trainer = PruningTrainer(
        model=job_data.fresh_model(job.seed, start_from),
        args=training_arguments(job, pruned_dir, pruned=True),
        pruning_config=pruning_config,
        teacher_model=dense_trainer.model if job.distill else None,
        train_dataset=data["train"],
        compute_metrics=compute_metrics,
    )
    start = time.perf_counter()
    trainer.train()
    results["arms"]["pruned"] = score_arm(trainer, data, pruning_config, time.perf_counter() - start)
    trainer.save_model()
    job_data.tokenizer.save_pretrained(pruned_dir)

    with open(os.path.join(job.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(job.output_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(format_table(results) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the arms: accuracy, macro-F1, sparsity of the pruned layers, parameters, time."""
    rows = [
        "| arm | accuracy | macro-F1 | sparsity (pruned layers) | non-zero params | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    dense_acc = results["arms"].get("dense", {}).get("accuracy")
    for name, arm in results["arms"].items():
        relative = f" ({arm['accuracy'] / dense_acc:.1%} of dense)" if dense_acc and name != "dense" else ""
        rows.append(
            f"| {name} | {arm['accuracy']:.4f}{relative} | {arm['macro_f1']:.4f} | {arm['sparsity']:.2%} | "
            f"{arm['nonzero_params']:,} / {arm['params']:,} | {arm['train_seconds']:.0f} |"
        )
    return "\n".join(rows)
