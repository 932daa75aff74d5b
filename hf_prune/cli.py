"""`hf-prune` command line: parses, then calls the modules that do the work.

    hf-prune train --config configs/default.yaml --target_sparsity 0.8 --max_steps 100
    hf-prune export outputs/default/pruned outputs/default/onnx --quantize dynamic
    hf-prune benchmark outputs/default/dense outputs/default/pruned --eval_file test.csv

`train`, and `benchmark` without `--eval_file`, use the packaged demo model and tweet data (`hf_prune.recipes`).
A config file is a flat YAML mapping of `JobArguments` and `PruningConfig` fields; every field can also be given
(or overridden) on the command line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional, Sequence

from transformers import HfArgumentParser

from .config import PruningConfig


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise SystemExit(f"hf-prune: --config {path!r} does not exist.") from None
    if not isinstance(data, dict):
        raise SystemExit(f"hf-prune: --config {path!r} must hold a mapping of option: value, got {type(data).__name__}.")
    return data


def parse_train_args(argv: Sequence[str]):
    """(JobArguments, PruningConfig) from an optional `--config` YAML file overridden by command-line flags."""
    from .recipes.job import JobArguments

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)

    parser = HfArgumentParser((JobArguments, PruningConfig), prog="hf-prune train")
    parser.add_argument("--config", default=None, help="YAML file of options; command-line flags override it.")
    if known.config:
        values = _read_yaml(known.config)
        allowed = {f.name for f in fields(JobArguments)} | {f.name for f in fields(PruningConfig)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise SystemExit(
                f"hf-prune: unknown option(s) {unknown} in {known.config}; allowed options are {sorted(allowed)}."
            )
        parser.set_defaults(**values)
    job, pruning_config, _ = parser.parse_args_into_dataclasses(args=list(rest) + ["--config", str(known.config)])
    return job, pruning_config


def _train(argv: Sequence[str]) -> int:
    from .recipes.job import format_table, run_job

    try:
        job, pruning_config = parse_train_args(argv)
    except ValueError as err:
        raise SystemExit(f"hf-prune: {err}") from None
    results = run_job(job, pruning_config)
    print()
    print(format_table(results))
    print(f"\nPruned model, pruning_config.json and sparsity report: {job.output_dir}/pruned")
    print(f"Results: {job.output_dir}/results.json, {job.output_dir}/results.md")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    from .export import OPTIMIZATION_LEVELS, QUANTIZATION_MODES, SPARSE_INITIALIZER_MODES

    parser = argparse.ArgumentParser(
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
            f"hf-prune benchmark: no --eval_file given, and the packaged tweet data it falls back to is unavailable "
            f"({err}). Pass --eval_file with your labelled data, or --eval_size 0 to time without scoring accuracy."
        ) from None


def _benchmark(argv: Sequence[str]) -> int:
    from .benchmark import BenchmarkArguments, format_markdown, run_benchmark

    defaults = BenchmarkArguments.__dataclass_fields__

    def described(name: str, text: Optional[str] = None) -> str:
        """The dataclass help, plus the argparse default unless the help already says what the default is."""
        text = text or defaults[name].metadata["help"]
        return text if "(default" in text else text + " (default: %(default)s)"

    parser = argparse.ArgumentParser(
        prog="hf-prune benchmark",
        description="Latency (p50/p90), throughput, size and accuracy of sequence-classification checkpoints in "
        "PyTorch and ONNX Runtime, side by side in one run. The first checkpoint is the baseline. Each checkpoint is "
        "first exported to ONNX (fp32, ORTOptimizer O2 and dynamic INT8, each verified against PyTorch), which takes "
        "minutes for real models; --runtimes pytorch skips the export. Accuracy is scored on --eval_file (a labelled "
        "csv/tsv/json/jsonl/parquet file); without it, on the packaged tweet-sentiment test split. Writes "
        "benchmark.json, benchmark.md and benchmark.png.",
    )
    parser.add_argument("checkpoints", nargs="+", help=defaults["checkpoints"].metadata["help"])
    parser.add_argument("--names", nargs="+", default=None, help=described("names"))
    parser.add_argument("--output_dir", default="outputs/benchmark", help=described("output_dir"))
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 32], help=described("batch_sizes"))
    parser.add_argument("--seq_len", type=int, default=64, help=described("seq_len"))
    parser.add_argument("--rounds", type=int, default=5, help=described("rounds"))
    parser.add_argument("--repeats", type=int, default=6, help=described("repeats"))
    parser.add_argument("--eval_file", default=None, help=described(
        "eval_file", "Labelled eval data: a .csv, .tsv, .json, .jsonl or .parquet file with text and label columns "
        "(default: the packaged tweet-sentiment test split)."))
    parser.add_argument("--text_columns", nargs="+", default=None,
                        help=described("text_columns").replace("sentence1 sentence2", "sentence1,sentence2"))
    parser.add_argument("--label_column", default="label", help=described("label_column"))
    parser.add_argument("--eval_size", type=int, default=2000, help=described("eval_size"))
    parser.add_argument("--no_int8", action="store_true",
                        help="Skip the INT8 ONNX Runtime arms (default: INT8 arms are measured).")
    parser.add_argument("--runtimes", nargs="+", default=["pytorch", "onnxruntime"], help=described("runtimes"))
    parser.add_argument("--threads", type=int, default=None, help=described("threads"))
    parser.add_argument("--optimize", default="O2", help=described(
        "optimize", "ORTOptimizer level of the optimised ONNX fp32 arm, or none to skip that arm"))
    args = parser.parse_args(list(argv))
    text_columns = None
    if args.text_columns:
        text_columns = [c for value in args.text_columns for c in value.split(",") if c]
    try:
        bench_args = BenchmarkArguments(
            checkpoints=args.checkpoints, names=args.names, output_dir=args.output_dir, batch_sizes=args.batch_sizes,
            seq_len=args.seq_len, rounds=args.rounds, repeats=args.repeats, eval_size=args.eval_size,
            eval_file=args.eval_file, text_columns=text_columns, label_column=args.label_column,
            int8=not args.no_int8, runtimes=args.runtimes, threads=args.threads,
            optimize=None if args.optimize == "none" else args.optimize,
        )
        eval_dataset, eval_name = None, None
        if bench_args.eval_file is None and bench_args.eval_size > 0:
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
        "export": (_export, "export a checkpoint to ONNX (verified, optimised, optional INT8)"),
        "benchmark": (_benchmark, "latency, size and accuracy of checkpoints in PyTorch and ONNX Runtime"),
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
