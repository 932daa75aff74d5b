"""`hf-prune sensitivity`: per-module pruning sensitivity of a fine-tuned classifier, and a sparsity plan.

    hf-prune sensitivity --model_name_or_path outputs/main/dense --target_sparsity 0.9

Loads the classifier and labelled data (the data options of `hf-prune train`), runs `hf_prune.analyze_sensitivity`
on the validation split (else train), allocates per-module sparsity for the target (`hf_prune.allocate_sparsity`)
and writes OUTPUT_DIR/sensitivity.json, sensitivity.csv, sensitivity.png and allocation.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch

from ..allocation import ALLOCATION_KINDS, allocate_sparsity, check_bounds
from ..files import atomic_write_text, hold_output_dir
from ..methods import available_methods, get_method
from ..plot import plot_sensitivity
from ..sensitivity import DEFAULT_LEVELS, GROUP_KINDS, METRICS, analyze_sensitivity, check_levels
from ..structure import load_pruned
from ..units import available_unit_criteria
from .job import JobArguments, JobData
from .parsing import PACKAGED_DATA_HELP, CommandParser, ModelArguments, packaged_splits, parse_command
from .train import TrainDataArguments


@dataclass
class SensitivityArguments(ModelArguments):
    """Options of `hf-prune sensitivity` (data options are those of `hf-prune train`)."""

    _argument_group_name = "sensitivity"  # HfArgumentParser groups these options under this title in --help

    output_dir: str = field(
        default="outputs/sensitivity",
        metadata={"help": "Where sensitivity.json, sensitivity.csv, sensitivity.png and allocation.json are written."},
    )
    levels: list[float] = field(
        default_factory=lambda: list(DEFAULT_LEVELS),
        metadata={"help": "Pruning levels: fractions of each group's weights (or of a layer's heads/neurons)."},
    )
    groups: Optional[list[str]] = field(
        default=None,
        metadata={"help": f"Kinds of groups to prune one at a time, among {list(GROUP_KINDS)} (default: all the "
                  "architecture supports). The allocation needs linear (or layer, see --allocation_kind)."},
    )
    method: str = field(
        default="magnitude",
        metadata={"help": "Weight criterion (a registered pruning method): magnitude, or movement (gradients over "
                  "the calibration batches)."},
    )
    importance: str = field(
        default="gradient",
        metadata={"help": "Head/neuron importance criterion for the heads and neurons groups (gradient, activation, "
                  "taylor, ...)."},
    )
    metric: Literal["accuracy", "loss"] = field(
        default="accuracy", metadata={"help": "Metric measured: accuracy (higher is better) or loss (lower is better)."}
    )
    split: Literal["auto", "validation", "train", "test"] = field(
        default="auto",
        metadata={"help": "Split the metric is measured on: auto takes validation when the data has one, else train."},
    )
    max_batches: Optional[int] = field(
        default=8, metadata={"help": "Batches of the split measured (the first ones, in order); fewer is faster."}
    )
    batch_size: int = field(default=32, metadata={"help": "Examples per batch."})
    target_sparsity: float = field(
        default=0.9,
        metadata={"help": "Global sparsity the allocation in allocation.json reaches exactly over the targeted "
                  "weights (the Linears inside the transformer blocks)."},
    )
    min_sparsity: float = field(default=0.0, metadata={"help": "Lowest sparsity any module is given."})
    max_sparsity: float = field(default=0.99, metadata={"help": "Highest sparsity any module is given (< 1)."})
    allocation_kind: Literal["linear", "layer"] = field(
        default="linear",
        metadata={"help": "Allocate per Linear (linear) or one sparsity per transformer layer (layer)."},
    )

    def __post_init__(self) -> None:
        check_levels(self.levels, "--levels ")
        self.levels = [float(v) for v in self.levels]
        if self.groups is not None:
            unknown = [g for g in self.groups if g not in GROUP_KINDS]
            if unknown or not self.groups:
                raise ValueError(f"--groups {self.groups!r} is invalid: choose among {list(GROUP_KINDS)}.")
            if self.allocation_kind not in self.groups:
                raise ValueError(f"--groups {self.groups!r} has no {self.allocation_kind!r} groups, which "
                                 f"--allocation_kind {self.allocation_kind} allocates from; add it.")
        if self.allocation_kind not in ALLOCATION_KINDS:
            raise ValueError(f"--allocation_kind {self.allocation_kind!r} is invalid: choose one of "
                             f"{list(ALLOCATION_KINDS)}.")
        if self.method not in available_methods() or get_method(self.method).requires_trainer:
            usable = [m for m in available_methods() if not get_method(m).requires_trainer]
            raise ValueError(f"--method {self.method!r} is invalid: choose a criterion that scores a trained model "
                             f"one-shot, one of {usable}.")
        if self.importance not in available_unit_criteria():
            raise ValueError(f"--importance {self.importance!r} is not a registered unit criterion; choose one of "
                             f"{list(available_unit_criteria())}.")
        if self.metric not in METRICS:
            raise ValueError(f"--metric {self.metric!r} is invalid: choose one of {list(METRICS)}.")
        if self.split not in ("auto", "validation", "train", "test"):
            raise ValueError(f"--split {self.split!r} is invalid: choose auto, validation, train or test.")
        for option in ("max_batches", "batch_size"):
            value = getattr(self, option)
            if value is None and option == "max_batches":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{option} {value!r} is invalid: a positive integer.")
        try:
            check_bounds("hf-prune sensitivity", self.target_sparsity, self.min_sparsity, self.max_sparsity,
                         ("target_sparsity", "min_sparsity", "max_sparsity"))
        except ValueError as err:
            raise ValueError(str(err).replace("hf-prune sensitivity: ", "--")) from None


def run_sensitivity(
    args: SensitivityArguments,
    data_args: Any,
    splits: Optional[Mapping[str, Any]] = None,
    sources: Union[None, str, Mapping[str, str]] = None,
    job_data: Any = None,
) -> dict[str, Any]:
    """`hf-prune sensitivity`: analyse a fine-tuned classifier on labelled data, allocate, write the files.

    Args:
        args: the command's options; `data_args`: a `hf_prune.data.DataArguments`; `splits`/`sources`: ready
            splits instead of its source; `job_data`: a `hf_prune.commands.job.JobData` already loaded for this model.

    Returns:
        {"result": SensitivityResult, "allocation": sparsity_overrides, "split": name, "files": {kind: path}}.
    """
    from torch.utils.data import DataLoader
    from transformers import default_data_collator


    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is not set: give the fine-tuned classifier to analyse (a folder, e.g. "
                         "outputs/main/dense from hf-prune train, or a Hub id).")
    if job_data is None:
        job_data = JobData(JobArguments(model_name_or_path=args.model_name_or_path), data_args, splits, sources)
    data = job_data.data
    split = args.split
    if split == "auto":
        split = "validation" if data.get("validation") is not None else "train"
    if data.get(split) is None:
        raise ValueError(f"--split {split}: the data has no {split} split (it has {sorted(data)}).")
    model = load_pruned(args.model_name_or_path).float().eval()
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"--model_name_or_path {args.model_name_or_path!r} loads as {type(model).__name__}, not a "
                         "sequence classifier: fine-tune one first (hf-prune train writes OUTPUT_DIR/dense).")
    names = job_data.label_names
    model_names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if model_names != names and model_names != [f"LABEL_{i}" for i in range(len(names))]:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path!r} predicts {model_names} but the data has "
                         f"the labels {names}: the sensitivity needs the model fine-tuned on this data.")
    if torch.cuda.is_available():
        model = model.cuda()
    loader = DataLoader(data[split].with_format("torch"), batch_size=args.batch_size, shuffle=False,
                        collate_fn=default_data_collator)
    result = analyze_sensitivity(model, loader, metric=args.metric, groups=args.groups, levels=args.levels,
                                 method=args.method, max_batches=args.max_batches, unit_importance=args.importance)
    source = job_data.classes.sources.get(split, split)
    result.info.update({"model": args.model_name_or_path, "split": split, "split_source": source,
                        "data": job_data.description})
    allocation = allocate_sparsity(result, args.target_sparsity, args.min_sparsity, args.max_sparsity,
                                   kind=args.allocation_kind)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    files = {"json": result.to_json(os.path.join(out, "sensitivity.json")),
             "csv": result.to_csv(os.path.join(out, "sensitivity.csv")),
             "allocation": atomic_write_text(os.path.join(out, "allocation.json"),
                                             json.dumps(allocation, indent=2) + "\n")}
    picture = plot_sensitivity(result.to_dict(), os.path.join(out, "sensitivity.png"))
    if picture:
        files["png"] = picture
    return {"result": result, "allocation": allocation, "split": split, "split_source": source, "files": files}


# ------------------------------------------------------------------------------------------------ command line
NAME = "sensitivity"
CLASSES = (SensitivityArguments, TrainDataArguments)


def make_parser() -> CommandParser:
    return CommandParser(
        CLASSES,
        prog="hf-prune sensitivity",
        description="Measure how a fine-tuned classifier's accuracy (or loss) suffers when each Linear, each "
        "block's attention, MLP, heads and FFN neurons, and each whole block is pruned alone at each --levels, and "
        "allocate per-module sparsity for --target_sparsity that prunes sensitive modules less. Measured on the "
        "validation split when the data has one, else on train (--split). Writes OUTPUT_DIR/sensitivity.json, "
        "sensitivity.csv, sensitivity.png (heatmap) and allocation.json. Data options are those of hf-prune train.",
        epilog="allocation.json is a sparsity_overrides mapping (one anchored regex per module): train with it by "
        "hf-prune train --sparsity_overrides \"$(cat OUTPUT_DIR/allocation.json)\" --target_sparsity T (the same "
        "T), or in a --config YAML file as `sparsity_overrides:` followed by the file's JSON object (JSON is YAML).",
        helps={"--dataset_name": PACKAGED_DATA_HELP,
               "--model_name_or_path": "Fine-tuned sequence-classification model (folder or Hub id; load_pruned "
                                       "checkpoints too). (default: none; required)"},
    )


def main(argv: Sequence[str]) -> int:
    try:
        args, data_args = parse_command(argv, CLASSES, make_parser, NAME)
        splits, sources = (None, None) if data_args.has_source else packaged_splits(NAME)
        job_data = JobData(JobArguments(model_name_or_path=args.model_name_or_path), data_args, splits=splits,
                           sources=sources)
        with hold_output_dir(args.output_dir):
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
