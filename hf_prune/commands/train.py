"""`hf-prune train`: fine-tune a dense and a pruned model side by side from the same weights and compare them.

    hf-prune train --config configs/default.yaml --target_sparsity 0.8 --max_steps 100
    hf-prune train --model_name_or_path bert-base-uncased --train_file reviews.csv --text_columns review

Four groups of options, one `HfArgumentParser`: `JobArguments` (model, pruned-arm learning rate, distillation),
`DataArguments` (Hub dataset or files, columns, splits), `PruningConfig` and Transformers' `TrainingArguments` (every
field: `--bf16`, `--gradient_accumulation_steps`, `--save_strategy`, `--report_to`, `--push_to_hub`, ...), with the
recipe's defaults on the dataclasses themselves (`TrainTrainingArguments`, `TrainDataArguments`). Without
`--dataset_name` / `--train_file` it uses the packaged tweet data and, without `--model_name_or_path`, the packaged
MiniLM (`hf_prune.recipes`). The work is `hf_prune.commands.job.run_job`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from transformers import TrainingArguments

from ..config import PruningConfig
from ..data import DataArguments
from ..files import hold_output_dir
from .job import JobArguments, JobData, format_table, run_job, validate_job
from .phases import PhaseMismatch
from .parsing import (
    PACKAGED_DATA_HELP,
    CommandParser,
    packaged_model,
    packaged_splits,
    parse_command,
    show_progress,
    with_defaults,
)

NAME = "train"

# The settings of the README's runs, where they differ from TrainingArguments' own defaults.
TRAIN_RECIPE: dict[str, Any] = {
    "output_dir": "outputs/main",
    "max_steps": 250,
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    # Same seed, same numbers: deterministic kernels where PyTorch has them (negligible cost on CPU).
    "full_determinism": True,
    "dataloader_num_workers": 0,
    "warmup_steps": None,  # None: WARMUP_FRACTION of max_steps, in whole steps (filled in by __post_init__)
}
# Learning-rate warm-up when --warmup_steps is not given, as a fraction of max_steps. Given as whole steps, since
# Transformers 5 dropped `warmup_ratio` and 4.x takes only integers as `warmup_steps`.
WARMUP_FRACTION = 0.06
WARMUP_HELP = "Linear learning-rate warm-up steps (default: 6%% of max_steps, in whole steps)."


def fill_warmup(args: TrainingArguments) -> None:
    """`warmup_steps=None`: WARMUP_FRACTION of `max_steps` in whole steps (or as a ratio when training by epochs)."""
    if args.warmup_steps is not None:
        return
    max_steps = args.max_steps or -1
    if getattr(args, "warmup_ratio", None):  # Transformers 4.x, ratio given: it applies when warmup_steps is 0
        args.warmup_steps = 0
    elif max_steps > 0:
        args.warmup_steps = int(round(WARMUP_FRACTION * max_steps))
    elif hasattr(args, "warmup_ratio"):  # Transformers 4.x, training by epochs
        args.warmup_steps, args.warmup_ratio = 0, WARMUP_FRACTION
    else:  # Transformers 5: a float below 1 is a ratio
        args.warmup_steps = WARMUP_FRACTION


@dataclass
class TrainTrainingArguments(with_defaults(TrainingArguments, TRAIN_RECIPE, {"warmup_steps": WARMUP_HELP})):
    """Transformers' `TrainingArguments` with `hf-prune train`'s recipe defaults (`TRAIN_RECIPE`)."""

    def __post_init__(self) -> None:
        fill_warmup(self)
        super().__post_init__()


@dataclass
class TrainDataArguments(with_defaults(DataArguments, {"max_length": 64})):
    """`DataArguments` with `hf-prune train`'s max_length: 64 tokens keep nearly every tweet or review whole at half
    the cost of the library's 128."""


class TrainArguments(NamedTuple):
    """What `parse_args` returns: the four option groups of `hf-prune train`."""

    job: JobArguments
    data: DataArguments
    pruning: PruningConfig
    training: TrainingArguments


CLASSES = (JobArguments, TrainDataArguments, PruningConfig, TrainTrainingArguments)


def make_parser() -> CommandParser:
    return CommandParser(
        CLASSES,
        prog="hf-prune train",
        description="Fine-tune a dense and a pruned model side by side from the same weights (same seed, data order "
        "and steps; the dense one is the pruned one's distillation teacher), score both on the test split, and write "
        "OUTPUT_DIR/dense, OUTPUT_DIR/pruned, results.json and results.md. Data: a Hub dataset (--dataset_name) or "
        "local files (--train_file, --validation_file, --test_file); without them, the packaged tweet-sentiment "
        "data. Every TrainingArguments option applies to both arms.",
        epilog="Defaults shown are those of hf-prune train: its recipe defaults (max_steps 250, learning_rate 1e-4, "
        "batch 32/128, logging_steps 25, save_strategy no, report_to none, output_dir outputs/main, max_length 64, "
        "warm-up 6% of max_steps) where they differ from the dataclasses' own (TrainingArguments', DataArguments'), "
        "and with --config FILE, the values from FILE (hf-prune train --config FILE --help shows them). Flags "
        "override the file.",
        helps={
            "--model_name_or_path": "Model folder or Hub id; its classification head is set to the data's labels "
            "(default: the packaged all-MiniLM-L6-v2).",
            "--dataset_name": PACKAGED_DATA_HELP,
            "--no_distill": "Train the pruned arm without a teacher: no distillation from the dense arm (whose score "
            "is still reported). (default: distill)",
        },
    )


def parse_args(argv: Sequence[str]) -> TrainArguments:
    """(JobArguments, DataArguments, PruningConfig, TrainingArguments) from an optional `--config` YAML file
    overridden by command-line flags, on top of the recipe defaults.

    Raises:
        SystemExit: a bad --config file or an unknown flag.
        ValueError: a value one of the dataclasses refuses (naming the option).
    """
    return TrainArguments(*parse_command(argv, CLASSES, make_parser, NAME))


def main(argv: Sequence[str]) -> int:
    with ExitStack() as held:
        try:
            args = parse_args(argv)
            splits, sources = (None, None) if args.data.has_source else packaged_splits(NAME)
            if not args.job.model_name_or_path:
                args.job.model_name_or_path = packaged_model(NAME)
            # Data, labels, tokenizer and model config are loaded and checked here, before any model or training.
            job_data = JobData(args.job, args.data, splits=splits, sources=sources)
            validate_job(args.job, args.training, job_data)
            held.enter_context(hold_output_dir(args.training.output_dir))
        except (ValueError, OSError) as err:
            raise SystemExit(f"hf-prune: {err}") from None
        show_progress("hf_prune.commands.job")
        try:
            results = run_job(args.job, args.data, args.pruning, args.training, job_data=job_data)
        except PhaseMismatch as err:  # found before the arm it concerns starts: an input error, said as one
            raise SystemExit(f"hf-prune: {err}") from None
    output_dir = args.training.output_dir
    print()
    print(f"Data: {results['data']['description']}")
    print(f"Labels: {', '.join(results['data']['label_names'])}")
    print()
    print(format_table(results))
    print(f"\nModels (with pruning_config.json and sparsity report in pruned/): {output_dir}/dense, {output_dir}/pruned")
    print(f"Results: {output_dir}/results.json, {output_dir}/results.md")
    return 0
