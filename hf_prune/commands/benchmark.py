"""Latency, throughput, size and accuracy of checkpoints side by side, in PyTorch and ONNX Runtime (fp32 and INT8).

    hf-prune benchmark outputs/default/dense outputs/default/pruned outputs/structured/pruned

Every checkpoint is loaded with `load_pruned`, exported with `export_onnx` (optimised graph + dynamic INT8, both
verified against PyTorch) and measured as up to four arms: PyTorch fp32, ONNX Runtime fp32 (the plain graph, fused by ONNX Runtime at load, and
the ORTOptimizer graph), ONNX Runtime INT8.
All arms are timed in the same process, interleaved round by round so that machine noise hits them alike; speedups
are ratios to the first checkpoint (the baseline, usually dense) measured in the same run:
PyTorch arms against the baseline in PyTorch, ONNX Runtime arms against the baseline's plain fp32 ONNX Runtime graph.
The FLOP-ratio limit (baseline FLOPs / arm FLOPs, from the layer shapes) says how much faster removal can make an
arm at best; scattered zeros do not change it, since no CPU kernel skips them.

Accuracy and macro-F1 are scored on any labelled data: a `datasets.Dataset` given to `run_benchmark`, or a
CSV / JSON / JSON Lines / Parquet file (`BenchmarkArguments.eval_file`), with one text column (or two, for sentence
pairs) and a label column (files, columns and the Hub come through `hf_prune.data`, as in `hf-prune train`). Labels are class ids of the baseline checkpoint (`config.num_labels` classes), or label
names that its `config.label2id` maps to ids. The timed batches are the first rows of the same data.

    from hf_prune.commands.benchmark import BenchmarkArguments, run_benchmark

    args = BenchmarkArguments(checkpoints=["dense", "pruned"], eval_file="sst2_validation.csv", eval_size=872)
    results = run_benchmark(args)   # or run_benchmark(args, eval_dataset=my_dataset["validation"])
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data import DATA_FILE_TYPES, DataArguments, check_data_file, check_label_column, class_value, load_data_file
from ..data import load_raw_splits
from ..data import parse_text_columns, resolve_text_columns
from ..files import OutputDirInUse, atomic_write_text, hold_output_dir
from ..masks import sparsity_report
from ..metrics import classification_metrics
from ..export import OPTIMIZATION_LEVELS, require_onnx
from ..runtime import onnx_logits_runner
from ..flops import encoder_flops
from ..structure import load_pruned, structure_summary
from .markdown import table
from .parsing import CommandParser, parse_command, subset

logger = logging.get_logger(__name__)

RUNTIMES = ("pytorch", "onnxruntime")
EVAL_FILE_TYPES = DATA_FILE_TYPES  # file suffix -> `datasets.load_dataset` builder (hf_prune.data)


@dataclass
class BenchmarkArguments:
    """What `hf-prune benchmark` measures; every field is a command-line option."""

    checkpoints: list[str] = field(default_factory=list, metadata={"help": "Checkpoint folders; the first is the baseline."})
    names: Optional[list[str]] = field(default=None, metadata={"help": "Display names (default: folder names)."})
    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Where JSON, Markdown, PNG and ONNX go."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Batch sizes timed."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per example (padded), as in training."})
    rounds: int = field(default=5, metadata={"help": "Interleaved rounds over all arms."})
    repeats: int = field(default=6, metadata={"help": "Timed calls per arm, batch size and round."})
    eval_size: int = field(
        default=2000,
        metadata={"help": "Examples scored for accuracy: the first eval_size rows of the eval data, or all of them if "
                  "there are fewer (0: skip accuracy)."},
    )
    eval_file: Optional[str] = field(
        default=None,
        metadata={"help": "Labelled eval data: a .csv, .tsv, .json, .jsonl or .parquet file, loaded with "
                  "datasets.load_dataset (default: none; pass eval_dataset to run_benchmark instead)."},
    )
    text_columns: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Text column, or two for sentence pairs (default: `text`, `sentence` or "
                  "`sentence1 sentence2`, the first the data has)."},
    )
    label_column: str = field(
        default="label",
        metadata={"help": "Label column: class ids, or label names in the baseline's config.label2id."},
    )
    int8: bool = field(default=True, metadata={"help": "Add a dynamic-INT8 ONNX Runtime arm per checkpoint."})
    runtimes: list[str] = field(default_factory=lambda: list(RUNTIMES), metadata={"help": "pytorch and/or onnxruntime."})
    threads: Optional[int] = field(default=None, metadata={"help": "Threads for both runtimes (default: all cores)."})
    optimize: Optional[str] = field(default="O2", metadata={"help": "ORTOptimizer level of the ONNX fp32 arm."})
    exports: Optional[list] = field(
        default=None,
        metadata={"help": "Existing export_onnx folders, one per checkpoint (None or '' to export that checkpoint): "
                  "timed as they are instead of exporting again."},
    )

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("checkpoints is empty: give at least one checkpoint folder (the first is the baseline).")
        for path in self.checkpoints:
            if not os.path.isdir(path):
                raise ValueError(f"checkpoints: {path!r} is not a directory.")
        if self.names is not None and len(self.names) != len(self.checkpoints):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.checkpoints)} checkpoints.")
        if self.optimize not in (None, "none", *OPTIMIZATION_LEVELS):
            raise ValueError(f"--optimize {self.optimize!r} is not allowed; choose one of {list(OPTIMIZATION_LEVELS)}, "
                             "or none to skip the optimised ONNX arm.")
        unknown = sorted(set(self.runtimes) - set(RUNTIMES))
        if unknown or not self.runtimes:
            raise ValueError(f"runtimes={self.runtimes!r} is not allowed; choose from {list(RUNTIMES)}.")
        for name in ("seq_len", "rounds", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer.")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes={self.batch_sizes!r} must be positive integers.")
        if self.eval_size < 0:
            raise ValueError(f"eval_size={self.eval_size!r} must be >= 0.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads!r} must be a positive integer.")
        if self.exports is not None:
            if len(self.exports) != len(self.checkpoints):
                raise ValueError(f"exports has {len(self.exports)} entries for {len(self.checkpoints)} checkpoints.")
            for path in self.exports:
                if path and not os.path.isfile(os.path.join(path, "hf_prune_export.json")):
                    raise ValueError(f"exports: {path!r} is not an export_onnx folder (no hf_prune_export.json).")
        if self.eval_file is not None:
            check_data_file(self.eval_file, "eval_file")
        self.text_columns = parse_text_columns(self.text_columns)
        if not self.label_column:
            raise ValueError("--label_column is empty: name the column that holds the labels.")


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass
class _Arm:
    name: str
    checkpoint: str
    runtime: str
    precision: str
    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    size_bytes: int
    flops: int
    info: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)  # batch size -> list of seconds


def _pytorch_runner(model: nn.Module) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    # inspect follows __wrapped__ through Transformers' forward decorators; __code__ would see only the wrapper.
    names = set(inspect.signature(model.forward).parameters)

    @torch.inference_mode()
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        return model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in names}).logits.numpy()

    return run


def _safetensors_bytes(directory: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def load_eval_file(path: str) -> datasets.Dataset:
    """A .csv, .tsv, .json, .jsonl or .parquet file as one `datasets.Dataset` (through `datasets.load_dataset`)."""
    return load_data_file(path, "eval_file")


def label_ids(dataset: datasets.Dataset, label_column: str, config: Any) -> np.ndarray:
    """Class ids of the baseline model for the labels in `label_column` (ids, or names in `config.label2id`)."""
    check_label_column(dataset, label_column, "the eval data")
    num_labels = config.num_labels
    label2id = dict(getattr(config, "label2id", None) or {})
    feature = dataset.features[label_column]
    values = list(dataset[label_column])
    if isinstance(feature, datasets.ClassLabel) and feature.names and set(feature.names) <= set(label2id):
        # The names say which class of the model each id is (-1, "no label" in datasets, stays out of range).
        values = [feature.names[v] if 0 <= v < len(feature.names) else v for v in values]
    ids = []
    for row, value in enumerate(values):
        key = class_value(value)  # strings stay; whole numbers (also 1.0 and bools) become int
        if isinstance(key, str):
            if key not in label2id:
                raise ValueError(f"Label {value!r} (row {row}, column {label_column!r}) is not a label of the baseline "
                                 f"model; its config.label2id knows {sorted(label2id)}.")
            key = int(label2id[key])
        if key is None:
            raise ValueError(f"Label {value!r} (row {row}, column {label_column!r}) is neither a class id nor a label "
                             "name; only classification labels can be scored.")
        if not 0 <= key < num_labels:
            raise ValueError(f"Label {value!r} (row {row}, column {label_column!r}) is out of range: the baseline "
                             f"model has config.num_labels={num_labels}, so class ids lie in 0..{num_labels - 1}.")
        ids.append(key)
    return np.asarray(ids, dtype=np.int64)


def _encode(tokenizer: Any, columns: Sequence[Sequence[Any]], seq_len: int) -> dict[str, np.ndarray]:
    for column in columns:
        for row, text in enumerate(column):
            if not isinstance(text, str):
                raise ValueError(f"Text {text!r} in row {row} of the eval data is not a string.")
    encoded = tokenizer(*[list(c) for c in columns], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="np")
    inputs = {k: np.asarray(v).astype(np.int64) for k, v in encoded.items()}
    if "token_type_ids" not in inputs:
        inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])
    return inputs


def _eval_data(tokenizer: Any, config: Any, args: BenchmarkArguments,
               dataset: Optional[datasets.Dataset]) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Encoded inputs (at least max(batch_sizes) rows, repeated if the data is shorter), labels of the first
    `eval_size` rows, and what was used (for `settings`)."""
    largest = max(args.batch_sizes)
    if dataset is None:
        # Nothing to score (eval_size 0): time on full-length inputs (padding does not change the work done).
        texts = [" ".join(["the quick brown fox jumps over the lazy dog"] * args.seq_len)] * largest
        return _encode(tokenizer, [texts], args.seq_len), np.zeros(0, np.int64), {"timing_inputs": "synthetic"}
    if len(dataset) == 0:
        raise ValueError("The eval data has no rows.")
    columns = resolve_text_columns(dataset, args.text_columns, "the eval data")
    n_scored = min(args.eval_size, len(dataset))
    if n_scored < args.eval_size:
        logger.warning(f"hf_prune: eval_size={args.eval_size} but the eval data has {len(dataset)} rows; scoring all.")
    labels = label_ids(dataset.select(range(n_scored)), args.label_column, config) if n_scored else np.zeros(0)
    rows = dataset.select(range(min(len(dataset), max(n_scored, largest))))
    inputs = _encode(tokenizer, [rows[c] for c in columns], args.seq_len)
    if len(rows) < largest:
        inputs = {k: np.resize(v, (largest, v.shape[1])) for k, v in inputs.items()}  # rows repeated in order
    return inputs, labels, {"text_columns": columns, "eval_examples": n_scored, "timing_inputs": "eval data"}


def _slice(inputs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[start:stop]) for k, v in inputs.items()}


def _build_arms(args: BenchmarkArguments, names: list[str]) -> list[_Arm]:
    arms = []
    exports = args.exports or [None] * len(args.checkpoints)
    for name, checkpoint, export_dir in zip(names, args.checkpoints, exports):
        model = load_pruned(checkpoint).float().eval()
        flops = encoder_flops(model, args.seq_len)
        report = sparsity_report(model)
        info = {"parameters": report["model_params"], "zero_parameters": report["model_zero_params"],
                "linear_sparsity": report["global_sparsity"], **structure_summary(model)}
        info = {k: info[k] for k in ("parameters", "zero_parameters", "linear_sparsity", "heads_per_layer",
                                     "intermediate_sizes")}
        if "pytorch" in args.runtimes:
            arms.append(_Arm(name, checkpoint, "pytorch", "fp32", _pytorch_runner(model),
                             _safetensors_bytes(checkpoint), flops, dict(info)))
        if "onnxruntime" in args.runtimes:
            from ..export import ExportResult, export_onnx

            if export_dir:
                onnx_dir = Path(export_dir)
                result = ExportResult.from_dir(onnx_dir)
            else:
                onnx_dir = Path(args.output_dir) / "onnx" / name
                result = export_onnx(checkpoint, onnx_dir, optimize=args.optimize,
                                     quantize="dynamic" if args.int8 else None, overwrite=True)
            # Both fp32 graphs: the plain one, which ONNX Runtime fuses itself at load, and ORTOptimizer's. Which
            # is faster depends on the model and the CPU (on pruned MiniLM here the plain one was).
            for variant in ("fp32", "optimized", "int8"):
                if variant not in result.files or (variant == "int8" and not args.int8) or (
                        variant == "optimized" and args.optimize is None):
                    continue
                path = onnx_dir / result.files[variant]
                export_info = {"onnx_file": str(path), "max_abs_diff": result.max_abs_diff.get(variant),
                               "sparse_initializers": result.sparse_initializers.get(variant, {}).get("converted", 0),
                               "export_notes": result.notes}
                precision = {"fp32": "fp32", "optimized": f"fp32 {result.optimization.get('applied')}",
                             "int8": "int8"}[variant]
                arms.append(_Arm(name, checkpoint, "onnxruntime", precision, onnx_logits_runner(path, args.threads),
                                 result.sizes_bytes[variant], flops, {**info, **export_info}))
    return arms


def _time_arms(arms: list[_Arm], inputs: dict[str, np.ndarray], args: BenchmarkArguments) -> None:
    batches = {b: _slice(inputs, 0, b) for b in args.batch_sizes}
    for arm in arms:
        for b, batch in batches.items():
            arm.times[b] = []
            for _ in range(2):
                arm.run(batch)  # warm-up: allocations, lazy kernel selection
    steps = args.rounds * len(arms) * len(batches)
    with tqdm(total=steps, desc="timing", unit="arm") as bar:
        for _ in range(args.rounds):
            for arm in arms:
                for b, batch in batches.items():
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        arm.run(batch)
                        arm.times[b].append(time.perf_counter() - start)
                    bar.update()


def _score(arm: _Arm, inputs: dict[str, np.ndarray], labels: np.ndarray, num_labels: int) -> dict[str, float]:
    predictions = []
    for start in range(0, len(labels), 32):
        predictions.append(np.argmax(arm.run(_slice(inputs, start, min(start + 32, len(labels)))), axis=-1))
    return classification_metrics(np.concatenate(predictions), labels, num_labels=num_labels)


def run_benchmark(
    args: BenchmarkArguments,
    eval_dataset: Optional[datasets.Dataset] = None,
    tokenizer: Any = None,
    eval_name: Optional[str] = None,
) -> dict[str, Any]:
    """Measure every arm, write benchmark.json / benchmark.md (and benchmark.png with matplotlib); return the results.

    Args:
        args: checkpoints and settings; `args.eval_file` is read when `eval_dataset` is None.
        eval_dataset: labelled eval data with the text column(s) and `args.label_column`; its first rows are also the
            timed batches. Give this or `args.eval_file` (neither is needed with `eval_size=0`: then the timed inputs
            are synthetic full-length texts).
        tokenizer: tokenizer of the checkpoints (default: loaded from the first checkpoint).
        eval_name: how benchmark.md names the eval data (default: the file name, or "eval_dataset").

    Raises:
        ValueError: no eval data while eval_size > 0, a missing column, a label the baseline model does not know, or
            checkpoints with different numbers of labels.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..runtime import available_cores

    if eval_dataset is not None and args.eval_file is not None:
        raise ValueError("Give the eval data once: eval_dataset or BenchmarkArguments.eval_file, not both.")
    if isinstance(eval_dataset, datasets.DatasetDict):
        raise ValueError(f"eval_dataset is a DatasetDict with splits {list(eval_dataset)}; pass one split, e.g. "
                         "eval_dataset['test'].")
    if args.eval_file is not None:
        eval_dataset = load_eval_file(args.eval_file)
        eval_name = eval_name or os.path.basename(args.eval_file)
    if eval_dataset is None and args.eval_size > 0:
        raise ValueError("No eval data to score: pass eval_dataset (a datasets.Dataset with text and label columns) to "
                         "run_benchmark, or set eval_file (--eval_file: csv/tsv/json/jsonl/parquet); or set "
                         "eval_size=0 (--eval_size 0) to time without scoring accuracy.")
    configs = [AutoConfig.from_pretrained(c) for c in args.checkpoints]
    num_labels = configs[0].num_labels
    for checkpoint, config in zip(args.checkpoints[1:], configs[1:]):
        if config.num_labels != num_labels:
            raise ValueError(f"{checkpoint} has config.num_labels={config.num_labels} but the baseline "
                             f"{args.checkpoints[0]} has {num_labels}; their predictions cannot be scored alike.")
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(args.checkpoints[0])
    # Data first: a bad label fails in seconds, before minutes of ONNX export.
    inputs, labels, data_info = _eval_data(tokenizer, configs[0], args, eval_dataset)
    data_info["eval_data"] = (eval_name or "eval_dataset") if eval_dataset is not None else None

    threads = args.threads or available_cores()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        names = args.names or [Path(c).name or str(c) for c in args.checkpoints]
        if len(set(names)) != len(names):
            names = [f"{i}-{n}" for i, n in enumerate(names)]
        arms = _build_arms(args, names)
        rows = []
        for arm in tqdm(arms, desc="accuracy", unit="arm") if len(labels) else []:
            arm.info.update(_score(arm, inputs, labels, num_labels))
        _time_arms(arms, inputs, args)
    finally:
        torch.set_num_threads(previous_threads)

    baseline = {runtime: next((a for a in arms if a.checkpoint == args.checkpoints[0] and a.runtime == runtime
                               and a.precision == "fp32"), None) for runtime in RUNTIMES}
    largest = max(args.batch_sizes)
    for arm in arms:
        row = {"name": arm.name, "checkpoint": arm.checkpoint, "runtime": arm.runtime, "precision": arm.precision,
               "size_mb": arm.size_bytes / 1e6, "gflops_per_example": arm.flops / 1e9, **arm.info}
        base = baseline[arm.runtime]
        row["flop_ratio_limit"] = base.flops / arm.flops if base else None
        for b, times in arm.times.items():
            row[f"p50_ms_b{b}"] = _percentile(times, 50) * 1000
            row[f"p90_ms_b{b}"] = _percentile(times, 90) * 1000
            if base:
                row[f"speedup_b{b}"] = statistics.median(base.times[b]) / statistics.median(times)
        row["throughput_per_s"] = largest / statistics.mean(arm.times[largest])
        if base and arm.precision.startswith("fp32") and row["flop_ratio_limit"]:
            row["speedup_of_flop_limit"] = row[f"speedup_b{largest}"] / row["flop_ratio_limit"]
        if base and "accuracy" in row and "accuracy" in base.info:
            row["accuracy_delta_points"] = (row["accuracy"] - base.info["accuracy"]) * 100
        rows.append(row)

    settings = {k: v for k, v in asdict(args).items()}
    settings.update(data_info, num_labels=num_labels, threads=threads, torch=torch.__version__,
                    cpu_cores=available_cores())
    try:
        import onnxruntime

        settings["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    results = {"settings": settings, "rows": rows}
    write_results(results, args.output_dir)
    return results


def format_report(results: dict[str, Any]) -> str:
    """benchmark.md: the data and settings, one row per arm, and what scattered zeros do not buy."""
    settings, rows = results["settings"], results["rows"]
    sizes = settings["batch_sizes"]
    largest = max(sizes)
    header = ["arm", "runtime", "accuracy", "Δ pts", "macro-F1", "size MB", "sparsity", "GFLOPs/ex", "FLOP limit"]
    for b in sizes:
        header += [f"b{b} p50 ms", f"b{b} p90 ms", f"b{b} speedup"]
    header += [f"ex/s (b{largest})", "of FLOP limit"]
    if "eval_data" not in settings:  # results written before the eval data was configurable
        data = f"Tweet sentiment test split ({settings['eval_size']} examples)"
    elif settings["eval_data"] is None:
        data = "Synthetic full-length inputs, no accuracy (eval_size 0)"
    elif not settings.get("eval_examples"):
        data = f"Timed on {settings['eval_data']}, no accuracy (eval_size 0)"
    else:
        data = f"{settings['eval_data']} ({settings['eval_examples']} examples scored)"
    lines = [
        f"{data}, seq {settings['seq_len']}, {settings['threads']} threads, {settings['rounds']}x{settings['repeats']} timed calls per arm and batch "
        f"size (interleaved). Speedups: vs the first checkpoint in the same runtime (ONNX Runtime arms vs its fp32 "
        "graph).",
        "",
    ]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table_rows = []
    for r in rows:
        cells = [
            r["name"], f"{r['runtime']} {r['precision']}", fmt(r.get("accuracy"), ".4f"),
            fmt(r.get("accuracy_delta_points"), "+.2f"), fmt(r.get("macro_f1"), ".4f"), f"{r['size_mb']:.1f}",
            f"{r['linear_sparsity']:.0%}", f"{r['gflops_per_example']:.2f}", fmt(r.get("flop_ratio_limit"), ".2f") + "x",
        ]
        for b in sizes:
            cells += [f"{r[f'p50_ms_b{b}']:.1f}", f"{r[f'p90_ms_b{b}']:.1f}", fmt(r.get(f"speedup_b{b}"), ".2f") + "x"]
        cells += [f"{r['throughput_per_s']:.0f}", fmt(r.get("speedup_of_flop_limit"), ".2f")]
        table_rows.append(cells)
    lines += table(header, table_rows)
    sparse_only = [r for r in rows if r["linear_sparsity"] > 0.3 and (r.get("flop_ratio_limit") or 1) < 1.05]
    if sparse_only:
        lines += [
            "",
            "Scattered (unstructured) zeros leave every matrix its full size: no CPU kernel here skips them, so those "
            "arms run at dense speed (their FLOP limit is 1.00x). Sparse initializers shrink the ONNX file only. "
            "For speed, remove heads and FFN neurons (head_sparsity / neuron_sparsity) and quantize to INT8.",
        ]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], output_dir: str) -> dict[str, str]:
    """benchmark.json, benchmark.md and (if matplotlib is installed) benchmark.png in `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "benchmark.json"), "markdown": os.path.join(output_dir, "benchmark.md")}
    for key, text in (("json", json.dumps(results, indent=2) + "\n"), ("markdown", format_report(results))):
        atomic_write_text(paths[key], text)
    from ..plot import plot_accuracy_latency

    png = plot_accuracy_latency(results, os.path.join(output_dir, "benchmark.png"))
    if png:
        paths["png"] = png
    return paths


# ------------------------------------------------------------------------------------------------ command line
NAME = "benchmark"
# The command's options are BenchmarkArguments' own, and its data options those of hf-prune train (DataArguments)
# that locate a test split; both keep their dataclasses' defaults and help.
BenchmarkOptions = subset(BenchmarkArguments, "BenchmarkOptions", (
    "names", "output_dir", "batch_sizes", "seq_len", "rounds", "repeats", "eval_size", "int8", "runtimes", "threads",
    "optimize"), helps={"optimize": "ORTOptimizer level of the optimised ONNX fp32 arm, or none to skip that arm"})
BenchmarkData = subset(DataArguments, "BenchmarkData", (
    "test_file", "train_file", "dataset_name", "dataset_config_name", "test_split_name", "text_columns",
    "label_column", "test_size", "split_seed"), helps={
    "test_file": "Labelled test data: a .csv, .tsv, .json, .jsonl or .parquet file with text and label columns; "
    "--eval_file is an alias. Without any data option (this, --train_file, --dataset_name) the packaged tweets are "
    "scored (default: the packaged tweet-sentiment test split).",
    "train_file": DataArguments.__dataclass_fields__["train_file"].metadata["help"] + " Only its carved test rows are "
    "scored (when there is no --test_file).",
    "label_column": "Label column: class ids, or label names in the baseline's config.label2id"})
BenchmarkOptions._argument_group_name = "benchmark"
BenchmarkData._argument_group_name = "data (the options of hf-prune train; accuracy is scored on the test split)"


def make_parser() -> CommandParser:
    parser = CommandParser(
        (BenchmarkOptions, BenchmarkData),
        prog="hf-prune benchmark",
        description="Latency (p50/p90), throughput, size and accuracy of sequence-classification checkpoints in "
        "PyTorch and ONNX Runtime, side by side in one run. The first checkpoint is the baseline. Each checkpoint is "
        "first exported to ONNX (fp32, ORTOptimizer O2 and dynamic INT8, each verified against PyTorch), which takes "
        "minutes for real models; --runtimes pytorch skips the export. Accuracy is scored on the test split of the "
        "data options, which are those of hf-prune train: --test_file (alias --eval_file), a --train_file whose test "
        "rows are carved with --test_size/--split_seed exactly as train carves them, or --dataset_name; without "
        "them, on the packaged tweet-sentiment test split. Writes benchmark.json, benchmark.md and benchmark.png.",
        helps={"--no_int8": "Skip the INT8 ONNX Runtime arms (default: INT8 arms are measured)."},
    )
    parser.add_alias("--test_file", "--eval_file")
    parser.add_argument("checkpoints", nargs="+",
                        help=BenchmarkArguments.__dataclass_fields__["checkpoints"].metadata["help"])
    return parser


def packaged_test_split(eval_size: int):
    """The packaged tweet-sentiment test split (the fixed split of `hf-prune train`), the default eval data."""
    from ..recipes.packaged import load_sentiment_splits

    try:
        return load_sentiment_splits(test_size=max(eval_size, 2000))["test"]
    except (ImportError, FileNotFoundError) as err:
        raise SystemExit(
            f"hf-prune benchmark: no data given (--test_file/--eval_file, --train_file or --dataset_name), and the "
            f"packaged tweet data it falls back to is unavailable ({err}). Pass --test_file (or its alias --eval_file) "
            f"with your labelled data, or --eval_size 0 to time without scoring accuracy."
        ) from None


def main(argv: Sequence[str]) -> int:
    positional: dict = {}
    options, data = parse_command(argv, (BenchmarkOptions, BenchmarkData), make_parser, NAME, extras=positional)
    try:
        data_args = DataArguments(**dataclasses.asdict(data))
        bench_args = BenchmarkArguments(
            checkpoints=positional["checkpoints"], text_columns=data_args.text_columns,
            label_column=data_args.label_column,
            **{**dataclasses.asdict(options), "optimize": None if options.optimize == "none" else options.optimize},
        )
        eval_dataset, eval_name = None, None
        if data_args.has_source:
            raw = load_raw_splits(data_args, need=("test",))  # the same test rows hf-prune train scores on
            eval_dataset, eval_name = raw["test"], f"test split: {raw.sources['test']}"
        elif bench_args.eval_size > 0:
            eval_dataset, eval_name = packaged_test_split(bench_args.eval_size), "Tweet sentiment test split"
        if "onnxruntime" in bench_args.runtimes:
            require_onnx()
        with hold_output_dir(bench_args.output_dir):
            results = run_benchmark(bench_args, eval_dataset=eval_dataset, eval_name=eval_name)
    except (ValueError, FileNotFoundError, ImportError, OutputDirInUse) as err:
        raise SystemExit(f"hf-prune benchmark: {err}") from None
    print(format_report(results))
    print(f"Results: {bench_args.output_dir}/benchmark.json, benchmark.md, benchmark.png")
    return 0
