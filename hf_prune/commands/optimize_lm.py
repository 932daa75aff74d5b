"""`hf-prune optimize` on a causal LM: a smaller dense decoder, aimed at a parameter or decode-speed target.

    hf-prune optimize --model_name_or_path my-llama --train_file train.txt --validation_file held_out.txt \\
        --target_params 0.6 --max_steps 200 --output_dir outputs/optimize-lm

The road Minitron describes (Muralidharan et al. 2024), on a Hugging Face checkpoint and `Trainer`:

1. importance from calibration text, once: attention heads (whole key/value groups), FFN neurons and hidden channels
   by the registered criteria (`--importance`; activation norms by default), layers by `--layer_importance` (block
   influence by default, or the loss when a layer is skipped);
2. the shape, from candidates cut from the dense model and measured before any training (parameters; decode
   tokens/s at batch 1 against the dense model when the target is a speed). By default the axes are searched, width
   first as Minitron recommends: heads+neurons, hidden width, both, depth, and half that depth with width; each
   family's least pruning that meets `--target_params` and/or `--target_speedup` is a finalist, and the finalist with
   the lowest held-out perplexity (right after the cut, or after `--search_steps` of distillation) wins. With
   `--layers_to_remove` / `--hidden_fraction` (or `--search_axes false`) those axes are fixed and only the fraction of
   heads and neurons is searched;
3. the cut, then recovery: `PruningTrainer` distils the cut model from the dense one (KL on the logits plus the LM
   loss, `--distillation_alpha`) on windows of the training text; every `TrainingArguments` flag applies;
4. measured on held-out text: perplexity of the dense, cut and recovered models, parameters, decode tokens/s and
   prefill latency in PyTorch (one interleaved run), and in ONNX Runtime with the key/value cache when Optimum can
   export the result (every layer alike: a plain config);
5. `OUT/model` (reloads with `load_pruned`, and with plain `from_pretrained` when every layer is alike; `generate()`
   with the key/value cache), `OUT/onnx/optimized` (the ONNX graph with a cache, when made) and
   `OUT/report.md|json|png`.

Under torchrun every process scores and cuts the same shape (timings are process 0's); process 0 writes.

Text: `--train_file` / `--validation_file` (.txt: documents separated by blank lines, or one per line when there
are none; .json/.jsonl/.csv with `--text_columns`), a Hub dataset (`--dataset_name`), or, without either, the
packaged BBC News articles (`hf_prune.recipes.packaged_lm`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from ..config import PruningConfig
from ..data import DataArguments
from ..export import ExportVerificationError, is_onnx_available
from ..files import atomic_write_text, last_complete_checkpoint, staged_directory
from ..latency import fraction_grid
from ..perplexity import evaluate_perplexity
from ..plot import plot_lm_candidates
from ..runtime import check_cache_export, decode_timings, onnx_decode_timings
from ..structure import (
    CONFIG_ATTR,
    STRUCTURE_NAME,
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    structure_summary,
)
from ..trainer import PruningTrainer
from ..units import select_heads_to_prune, select_neurons_to_prune
from .job import arm_training_arguments
from .markdown import table
from .phases import PhaseStore, identity, training_record
from .parsing import from_pretrained_option
from .shapes import Importance, cut, score_structures

logger = logging.get_logger(__name__)

def is_causal_lm(model_name_or_path: str) -> bool:
    """Whether the checkpoint is a causal LM, read from its config (architectures, else the model type)."""
    config = from_pretrained_option(AutoConfig, model_name_or_path, "model_name_or_path")
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a in names or a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.is_encoder_decoder


# ------------------------------------------------------------------------------------------------------- text
def read_documents(path: str, text_column: str, option: str = "--train_file",
                   column_option: str = "--text_columns") -> list[str]:
    """The documents of a local file: .txt split at blank lines (or at lines when there are none); .json, .jsonl
    and .csv read with `datasets`, one document per row of `text_column`. Errors name `option` (the file's option)
    or `column_option`."""
    if not os.path.isfile(path):
        raise ValueError(f"{option} {path!r} is not a file" + (" (it is a folder)" if os.path.isdir(path) else "")
                         + ": give a .txt, .json, .jsonl or .csv file of text.")
    kind = {"txt": "txt", "json": "json", "jsonl": "json", "csv": "csv"}.get(path.rsplit(".", 1)[-1].lower())
    if kind is None:
        raise ValueError(f"{option} {path!r}: give a .txt, .json, .jsonl or .csv file of text.")
    if kind == "txt":
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        if "\x00" in text:
            raise ValueError(f"{option} {path!r} is not text (it holds NUL bytes): give a UTF-8 text file.")
        parts = [p.strip() for p in text.split("\n\n")] if "\n\n" in text else text.splitlines()
        documents = [p for p in (p.strip() for p in parts) if p]
    else:
        import datasets

        try:
            rows = datasets.load_dataset(kind, data_files=path, split="train")
        except Exception as err:  # the readers raise many types (DatasetGenerationError, ArrowInvalid, ...)
            raise ValueError(f"{option} {path!r} could not be read as {kind}: {err}") from None
        if text_column not in rows.column_names:
            raise ValueError(f"{column_option} {text_column!r} is not a column of {path!r}; it has "
                             f"{rows.column_names}.")
        documents = [t for t in rows[text_column] if isinstance(t, str) and t.strip()]
    if not documents:
        raise ValueError(f"{option} {path!r} holds no text.")
    return documents


def load_text(data_args: DataArguments) -> tuple[list[str], list[str], str]:
    """(training documents, held-out documents, where they came from)."""
    column = (data_args.text_columns or ["text"])[0]
    if data_args.train_file:
        if not data_args.validation_file:
            raise ValueError("--train_file without --validation_file: perplexity must be measured on text the "
                             "recovery did not train on; give --validation_file too.")
        return (read_documents(data_args.train_file, column),
                read_documents(data_args.validation_file, column, option="--validation_file"),
                f"{data_args.train_file} / {data_args.validation_file}")
    if data_args.dataset_name:
        import datasets

        def split(name: str) -> list[str]:
            rows = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=name)
            if column not in rows.column_names:
                raise ValueError(f"--text_columns {column!r} is not a column of {data_args.dataset_name}; it has "
                                 f"{rows.column_names}.")
            return [t for t in rows[column] if t]

        held_out = data_args.validation_split_name
        return split("train"), split(held_out), f"{data_args.dataset_name} (train / {held_out})"
    from ..recipes.packaged_lm import news_articles

    return (news_articles("calibration"), news_articles("held_out"),
            "packaged BBC News articles (calibration / held-out)")


def token_ids(tokenizer: Any, documents: list[str]) -> torch.Tensor:
    """The documents tokenized and joined into one 1-D stream, an end-of-sequence token between them."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + eos
    return torch.tensor(ids, dtype=torch.long)


class Windows(torch.utils.data.Dataset):
    """Consecutive windows of `block_size` tokens of a token stream, as causal-LM training examples."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        count = ids.numel() // block_size
        if count < 1:
            raise ValueError(f"the training text has {ids.numel()} tokens; --block_size {block_size} needs more.")
        self.windows = ids[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.windows[i]
        return {"input_ids": window, "attention_mask": torch.ones_like(window), "labels": window.clone()}


def prune_uniformly(model: torch.nn.Module, heads: torch.Tensor, neurons: dict, fraction: float) -> None:
    """Remove `fraction` of every layer's key/value groups and FFN neurons (each layer its own lowest), so that all
    layers keep the same shapes: what a plain config describes (`--uniform_layers`)."""
    summary = structure_summary(model)
    group, per_layer = summary["head_group_size"], summary["num_attention_heads"]
    head_count = int(round(fraction * per_layer / group)) * group
    head_count = min(head_count, per_layer - group)  # every layer keeps one group
    neuron_count = int(round(fraction * summary["intermediate_size"]))
    layers = range(len(summary["heads_per_layer"]))
    prune_heads(model, select_heads_to_prune(heads, layer_budget={i: head_count for i in layers}, model=model))
    prune_ffn_neurons(model, select_neurons_to_prune(neurons, layer_budget={i: neuron_count for i in layers},
                                                     model=model))


def write_uniform_config(directory: str, model: torch.nn.Module) -> None:
    """Rewrite `directory`'s config.json with the model's uniform shapes (heads, key/value heads, FFN size, layers,
    head size) and drop hf_prune's structure record (config and sidecar file): plain `from_pretrained` then builds
    exactly these shapes, and so does `load_pruned`."""
    summary = structure_summary(model)
    for name in ("heads_per_layer", "intermediate_sizes"):
        if len(set(summary[name])) > 1:
            raise ValueError(f"--uniform_layers: the layers have different {name} {summary[name]}.")
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    heads = summary["heads_per_layer"][0]
    config.update(num_attention_heads=heads, num_key_value_heads=heads // summary["head_group_size"],
                  intermediate_size=summary["intermediate_sizes"][0], num_hidden_layers=summary["num_layers"],
                  hidden_size=summary["hidden_size"], head_dim=summary["head_dim"])
    config.pop(CONFIG_ATTR, None)
    config.pop("pruned_heads", None)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    sidecar = os.path.join(directory, STRUCTURE_NAME)
    if os.path.isfile(sidecar):  # the record's copy beside the weights: it would re-prune the uniform shapes
        os.remove(sidecar)


def plain_when_uniform(directory: str) -> bool:
    """Give the saved model in `directory` a plain config (`write_uniform_config`) when every layer has the same
    shapes, as after depth or width pruning, so that plain `from_pretrained` and Optimum's exporter load it; kept
    only when plain `AutoModelForCausalLM.from_pretrained` then gives the logits `load_pruned` gave before, else the
    structure record is put back (a family whose config has per-layer fields plain loading would miss)."""
    reference = load_pruned(directory).float().eval()
    summary = structure_summary(reference)
    if any(len(set(summary[name])) > 1 for name in ("heads_per_layer", "intermediate_sizes")):
        return False
    kept = {}
    for name in ("config.json", STRUCTURE_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                kept[path] = handle.read()
    write_uniform_config(directory, reference)
    ids = torch.arange(1, 17).unsqueeze(0) % reference.config.vocab_size
    try:
        plain = AutoModelForCausalLM.from_pretrained(directory).float().eval()
        with torch.no_grad():
            same = torch.allclose(plain(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    except (ValueError, RuntimeError, OSError, KeyError) as err:  # shapes the plain config cannot build
        logger.info(f"the saved model keeps its structure record: plain from_pretrained fails ({err})")
        same = False
    if not same:
        for path, text in kept.items():
            atomic_write_text(path, text)
    return same


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ phases
def same_on_every_rank(value: Any) -> Any:
    """`value` as process 0 has it, on every process of a distributed run (as is otherwise): timings differ between
    processes, and every process must cut and train the same shape."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


@dataclass
class Candidate:
    """One shape cut from the dense model before training: the axes it prunes and how much, its size, and (when
    measured) its speed and held-out perplexity."""

    axes: str
    fraction: float  # of attention heads (whole key/value groups) and FFN neurons
    params_ratio: float
    layers_removed: int = 0
    hidden_fraction: float = 0.0
    decode_speedup: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None
    prefill_ms: Optional[float] = None
    perplexity_after_cut: Optional[float] = None
    perplexity_after_search: Optional[float] = None
    chosen: bool = False

    def describe(self) -> str:
        parts = [f"{self.fraction:.0%} of heads and neurons" if self.fraction else "",
                 f"{self.hidden_fraction:.0%} of the hidden size" if self.hidden_fraction else "",
                 f"{self.layers_removed} layers" if self.layers_removed else ""]
        return " + ".join(p for p in parts if p) + " removed" if any(parts) else "nothing removed"


# What a family of candidates removes at each step of its grid: (fraction of heads and neurons, layers, hidden).
Shape = tuple[float, int, float]


class OptimizeLMRun:
    """One `hf-prune optimize` run on a causal LM, in phases: score, search, cut, recover, measure, report."""

    def __init__(self, opt: Any, pruning_config: PruningConfig, training_args: TrainingArguments,
                 data_args: DataArguments) -> None:
        self.opt, self.training_args = opt, training_args
        self.recovery_config = dataclasses.replace(pruning_config, head_sparsity=0.0, neuron_sparsity=0.0)
        self.out = training_args.output_dir
        self.phases: dict[str, float] = {}
        # None: search unless an axis is fixed by the user (then the road is heads+neurons with those fixed).
        self.search_axes = opt.search_axes if opt.search_axes is not None else \
            not (opt.layers_to_remove or opt.hidden_fraction)
        self.processes = training_args.world_size  # also sets up the process group of a distributed run
        train_docs, held_docs, self.description = load_text(data_args)  # the text first: a bad file fails at once
        self.tokenizer = AutoTokenizer.from_pretrained(opt.model_name_or_path)
        self.dense = load_pruned(opt.model_name_or_path).float().eval()
        self.dense_params = parameters(self.dense)
        self.train_ids, self.held_ids = token_ids(self.tokenizer, train_docs), token_ids(self.tokenizer, held_docs)
        self.windows = Windows(self.train_ids, opt.block_size)
        self.prompt = self.held_ids[: opt.prompt_tokens].unsqueeze(0)
        self.found: Optional[Importance] = None
        self.plain_config = bool(opt.uniform_layers)  # OUT/model loads with plain from_pretrained
        # Finished phases kept in OUT/phases with what produced them: a rerun of the same command continues.
        self.store = PhaseStore(self.out, enabled=opt.resume_phases)
        self.inputs = {"model": identity(opt.model_name_or_path), "train_file": identity(data_args.train_file),
                       "validation_file": identity(data_args.validation_file), "text": self.description}

    def record(self, phase: str, chosen: Optional[Candidate] = None) -> dict[str, Any]:
        """What phase `phase` depends on (options and inputs), as the phase store compares it."""
        opt, args = self.opt, self.training_args
        record = {**self.inputs, "importance": opt.importance, "layer_importance": opt.layer_importance,
                  "calibration_batches": opt.calibration_batches, "block_size": opt.block_size,
                  "batch_size": args.per_device_train_batch_size, "seed": args.seed, "search_axes": self.search_axes,
                  "layers_to_remove": opt.layers_to_remove, "hidden_fraction": opt.hidden_fraction}
        if phase == "importance":
            return record
        record.update({name: getattr(opt, name) for name in (
            "target_params", "target_speedup", "speedup_margin", "fraction_step", "max_fraction", "uniform_layers",
            "search_steps", "eval_tokens", "prompt_tokens", "decode_tokens", "timing_rounds", "distill")})
        if phase == "search":
            return record
        record.update({"chosen": asdict(chosen), "pruning_config": self.recovery_config.to_dict(),
                       **training_record(args)})
        return record

    def is_main(self) -> bool:
        return self.training_args.process_index == 0

    def perplexity(self, model: torch.nn.Module) -> float:
        return evaluate_perplexity(model.eval(), input_ids=self.held_ids, window=self.opt.block_size,
                                   max_tokens=self.opt.eval_tokens or None).perplexity

    def score(self) -> None:
        """Importance of heads, neurons, layers and hidden channels on calibration windows of the training text."""
        start = time.perf_counter()
        kept = self.store.fetch("importance", self.record("importance"))
        if kept is not None:
            self.found = Importance(**kept)
            return
        calibration = DataLoader(self.windows, batch_size=self.training_args.per_device_train_batch_size,
                                 shuffle=True, generator=torch.Generator().manual_seed(self.training_args.seed),
                                 collate_fn=default_data_collator)
        self.found = score_structures(self.dense, calibration, self.opt, every_axis=self.search_axes)
        if self.is_main():
            self.store.keep("importance", self.record("importance"), asdict(self.found))
        self.phases["importance_seconds"] = time.perf_counter() - start

    def importance_of(self, candidate: Candidate) -> Importance:
        """The scores with the candidate's layers and hidden channels going."""
        return self.found.with_axes(self.dense, candidate.layers_removed, candidate.hidden_fraction)

    def shaped(self, candidate: Candidate) -> torch.nn.Module:
        """The dense model cut to the candidate's shape."""
        remove = prune_uniformly if self.opt.uniform_layers else None
        return cut(self.dense, self.importance_of(candidate), candidate.fraction, remove).eval()

    # ----------------------------------------------------------------------------------------------- search
    def families(self) -> list[tuple[str, list, Any]]:
        """The axes searched, width first (Minitron: width pruning recovers better than depth at the same size),
        each with its grid, least pruning first, and the shape at each grid value."""
        opt = self.opt
        grid = fraction_grid(opt.fraction_step, opt.max_fraction)
        if not self.search_axes:
            return [("heads+neurons", grid, lambda f: (f, opt.layers_to_remove, opt.hidden_fraction))]
        layers = range(1, structure_summary(self.dense)["num_layers"])
        return [("heads+neurons", grid, lambda f: (f, 0, 0.0)),
                ("hidden", grid, lambda f: (0.0, 0, f)),
                ("hidden+heads+neurons", grid, lambda f: (f, 0, f)),
                ("depth", list(layers), lambda d: (0.0, d, 0.0))]

    def candidate(self, axes: str, shape: Shape) -> Candidate:
        """The shape cut from the dense model, its size, and its decode speed when the target is a speed and the
        size does not already rule it out."""
        fraction, layers, hidden = shape
        candidate = Candidate(axes, fraction, 0.0, layers_removed=layers, hidden_fraction=hidden)
        model = self.shaped(candidate)
        candidate.params_ratio = parameters(model) / self.dense_params
        opt = self.opt
        if opt.target_speedup is not None and (opt.target_params is None or candidate.params_ratio <= opt.target_params):
            timing = same_on_every_rank(decode_timings({"dense": self.dense, "candidate": model}, self.prompt,
                                                       opt.decode_tokens, opt.timing_rounds))
            candidate.decode_tokens_per_s = timing["candidate"]["decode_tokens_per_s"]
            candidate.prefill_ms = timing["candidate"]["prefill_ms"]
            candidate.decode_speedup = candidate.decode_tokens_per_s / timing["dense"]["decode_tokens_per_s"]
        logger.info(f"candidate ({axes}): {candidate.describe()}, {candidate.params_ratio:.2f} of the parameters"
                    + (f", decode {candidate.decode_speedup:.2f}x" if candidate.decode_speedup else ""))
        return candidate

    def walk(self, axes: str, grid: list, shape: Any) -> list[Candidate]:
        """The family's candidates up to the first that meets the target (all of them when none does)."""
        tried = []
        for value in grid:
            tried.append(self.candidate(axes, shape(value)))
            if self.meets(tried[-1]):
                break
        return tried

    def search(self) -> tuple[Candidate, list[Candidate], bool]:
        """Each family's least pruning that meets the target, from candidates cut and measured before any training;
        of those, the lowest held-out perplexity (after the cut, or after --search_steps of distillation)."""
        opt, start = self.opt, time.perf_counter()
        kept = self.store.fetch("search", self.record("search"))
        if kept is not None:
            tried = [Candidate(**c) for c in kept["tried"]]
            return tried[kept["chosen"]], tried, kept["met"]
        tried: list[Candidate] = []
        finalists: list[Candidate] = []
        for axes, grid, shape in self.families():
            walked = self.walk(axes, grid, shape)
            tried += walked
            finalists.append(walked[-1])
            if axes == "depth" and walked[-1].layers_removed >= 2:
                # Half the depth the target needs, the rest from width: the mix Minitron found best after depth.
                half = walked[-1].layers_removed // 2
                walked = self.walk("depth+width", fraction_grid(opt.fraction_step, opt.max_fraction),
                                   lambda f, half=half: (f, half, f))
                tried += walked
                finalists.append(walked[-1])
        met = [c for c in finalists if self.meets(c)]
        if met:
            if len(finalists) > 1 or opt.search_steps:
                for candidate in met:
                    self.compare(candidate)
            key = (lambda c: c.perplexity_after_search) if opt.search_steps else (lambda c: c.perplexity_after_cut)
            chosen = min(met, key=lambda c: key(c) if key(c) is not None else float("inf"))  # ties: width first
        else:
            chosen = min(finalists, key=self.shortfall)
            logger.warning(f"hf_prune optimize: no candidate meets the target (the most pruned of each family tried); "
                           f"continuing with the closest: {chosen.describe()} ({chosen.axes}).")
        chosen.chosen = True
        self.phases["search_seconds"] = time.perf_counter() - start
        if self.is_main():
            self.store.keep("search", self.record("search"),
                            {"tried": [asdict(c) for c in tried], "chosen": tried.index(chosen), "met": bool(met)})
        return chosen, tried, bool(met)

    def compare(self, candidate: Candidate) -> None:
        """Held-out perplexity of the candidate right after the cut, and after --search_steps of distillation."""
        model = self.shaped(candidate)
        candidate.perplexity_after_cut = same_on_every_rank(self.perplexity(model))
        if self.opt.search_steps:
            trainer = self.recover(model, arm=f"search-{candidate.axes}", max_steps=self.opt.search_steps)
            candidate.perplexity_after_search = same_on_every_rank(self.perplexity(trainer.model))
        logger.info(f"search ({candidate.axes}): {candidate.describe()}: held-out perplexity "
                    f"{candidate.perplexity_after_cut:.2f} after the cut"
                    + (f", {candidate.perplexity_after_search:.2f} after {self.opt.search_steps} steps"
                       if candidate.perplexity_after_search is not None else ""))

    def shortfall(self, candidate: Candidate) -> float:
        """How far a candidate is from the target (1 or less: met), the worse of size and speed."""
        opt, worst = self.opt, 0.0
        if opt.target_params is not None:
            worst = max(worst, candidate.params_ratio / opt.target_params)
        if opt.target_speedup is not None:
            worst = max(worst, opt.target_speedup / max(candidate.decode_speedup or 1e-9, 1e-9))
        return worst

    def meets(self, candidate: Candidate) -> bool:
        opt = self.opt
        if opt.target_params is not None and candidate.params_ratio > opt.target_params:
            return False
        if opt.target_speedup is not None and (candidate.decode_speedup is None or candidate.decode_speedup
                                               < opt.target_speedup * (1 + opt.speedup_margin)):
            return False
        return True

    # ---------------------------------------------------------------------------------------------- recover
    def recover(self, model: torch.nn.Module, arm: str = "recovery", max_steps: Optional[int] = None,
                record: Optional[dict[str, Any]] = None) -> PruningTrainer:
        """Distil the cut model from the dense one on the training windows (every TrainingArguments flag applies);
        `max_steps` for a search's short recovery, which saves nothing. With `record` (the final recovery), a run
        killed after a checkpoint (--save_strategy steps) continues from its last one when the record matches."""
        start = time.perf_counter()
        args = dataclasses.replace(arm_training_arguments(self.training_args, arm), push_to_hub=False)
        if max_steps is not None:
            args = dataclasses.replace(args, max_steps=max_steps, save_strategy="no", report_to=[])
        logger.info(f"{arm}: {args.max_steps} steps at lr {args.learning_rate:g} on {len(self.windows)} windows of "
                    f"{self.opt.block_size} tokens{', distilled from the dense model' if self.opt.distill else ''}")
        trainer = PruningTrainer(model=model.train(), args=args, pruning_config=self.recovery_config,
                                 teacher_model=self.dense if self.opt.distill else None, train_dataset=self.windows,
                                 data_collator=default_data_collator)
        resume = None
        if record is not None:
            last = last_complete_checkpoint(args.output_dir)
            if last is not None and self.store.fetch("recovery_started", record, marker=True) is not None:
                logger.info(f"{arm}: continuing from {last}")
                resume = last
            elif self.is_main():
                self.store.keep("recovery_started", record, {"output_dir": args.output_dir})
        trainer.train(resume_from_checkpoint=resume)
        self.phases[f"{arm}_seconds"] = time.perf_counter() - start
        return trainer

    def save(self, trainer: PruningTrainer) -> str:
        """OUT/model: weights, structure record and tokenizer together (one rename), on process 0."""
        model_dir = os.path.join(self.out, "model")
        if not trainer.is_world_process_zero():
            trainer.save_model(model_dir)  # the other processes take part (FSDP gathers the weights), write nothing
            return model_dir
        with staged_directory(model_dir) as staging:
            trainer.save_model(staging)
            self.tokenizer.save_pretrained(staging)
            if self.opt.uniform_layers:
                write_uniform_config(staging, trainer.model)
            else:
                self.plain_config = plain_when_uniform(staging)
        return model_dir

    def measure(self, models: dict[str, torch.nn.Module]) -> dict[str, dict[str, Any]]:
        """Parameters, held-out perplexity, decode tokens/s and prefill ms of each model (timed in one run)."""
        start = time.perf_counter()
        timings = decode_timings({k: m.eval() for k, m in models.items()}, self.prompt, self.opt.decode_tokens,
                                 self.opt.benchmark_rounds)
        dense_speed = timings["dense"]["decode_tokens_per_s"]
        rows = {}
        for name, model in models.items():
            rows[name] = {"parameters": parameters(model), "params_ratio": parameters(model) / self.dense_params,
                          "perplexity": self.perplexity(model), **timings[name],
                          "decode_speedup": timings[name]["decode_tokens_per_s"] / dense_speed}
        self.phases["benchmark_seconds"] = time.perf_counter() - start
        return rows

    def measure_onnx(self, model_dir: str) -> dict[str, Any]:
        """Prefill and decode of the dense and saved models in ONNX Runtime with the key/value cache (Optimum's
        export, greedy tokens checked against PyTorch); the graph of the result is kept in OUT/onnx/optimized. What
        cannot be measured says why: a model whose layers differ has no config Optimum's cache fits."""
        if not self.opt.onnx_decode:
            return {"skipped": "--onnx_decode false"}
        if not is_onnx_available():
            return {"skipped": "the onnx extra is not installed (pip install 'hf_prune[onnx]')"}
        start = time.perf_counter()
        export_dir = os.path.join(self.out, "onnx")
        try:
            check_cache_export(model_dir)
            with tempfile.TemporaryDirectory(dir=self.out) as dense_dir:
                self.dense.save_pretrained(dense_dir)
                timings = onnx_decode_timings({"dense": dense_dir, "optimized": model_dir}, self.prompt,
                                              self.opt.decode_tokens, self.opt.benchmark_rounds, export_dir)
        except (ValueError, RuntimeError, ImportError, ExportVerificationError) as err:
            logger.warning(f"hf_prune optimize: no ONNX Runtime decode timing: {err}")
            return {"skipped": str(err)}
        finally:
            shutil.rmtree(os.path.join(export_dir, "dense"), ignore_errors=True)  # the dense graph was a yardstick
        self.phases["onnx_seconds"] = time.perf_counter() - start
        speedup = timings["optimized"]["decode_tokens_per_s"] / timings["dense"]["decode_tokens_per_s"]
        return {**timings, "decode_speedup": speedup, "graph": os.path.join(export_dir, "optimized")}


def run_optimize_lm(opt: Any, data_args: DataArguments, pruning_config: PruningConfig,
                    training_args: TrainingArguments) -> dict[str, Any]:
    """`hf-prune optimize` for a causal LM (see the module docstring); returns the report, also written to
    OUT/report.json and OUT/report.md."""
    wall = time.perf_counter()
    if opt.max_accuracy_drop is not None:
        raise ValueError("--max_accuracy_drop is an accuracy budget for classifiers; for a causal LM give "
                         "--target_params and/or --target_speedup (decode tokens/s at batch 1).")
    if opt.target_params is None and opt.target_speedup is None:
        raise ValueError("give a target for the causal LM: --target_params F (fraction of parameters kept, e.g. "
                         "0.6) and/or --target_speedup X (decode tokens/s at batch 1, e.g. 1.5).")
    opt = dataclasses.replace(opt, importance=opt.importance or "activation")
    os.makedirs(training_args.output_dir, exist_ok=True)
    run = OptimizeLMRun(opt, pruning_config, training_args, data_args)
    run.score()
    chosen, tried, met = run.search()
    cut = run.shaped(chosen)
    cut_perplexity = chosen.perplexity_after_cut or run.perplexity(cut)
    record = run.record("recovery", chosen)
    model_dir = os.path.join(training_args.output_dir, "model")
    finished = run.store.fetch("recovery", record) if os.path.isdir(model_dir) else None
    if finished is None:
        trainer = run.recover(cut, record=record)
        model_dir = run.save(trainer)
        if run.is_main():
            run.store.keep("recovery", record, {"model": model_dir, "plain_config": run.plain_config})
    else:  # OUT/model is this run's recovered model: only the measurements are made again
        run.plain_config = finished["plain_config"]
    if not run.is_main():
        return {}
    # Measured as a user loads it: the saved folder (under FSDP the trainer's copy is sharded).
    optimized = load_pruned(model_dir).float().eval()
    rows = run.measure({"dense": run.dense, "optimized": optimized})
    rows["optimized"]["perplexity_after_cut"] = cut_perplexity
    summary = structure_summary(optimized)
    shape = {k: summary[k] for k in ("heads_per_layer", "intermediate_sizes", "num_layers", "hidden_size")}
    report = lm_report(run, chosen, tried, met, rows, model_dir, shape)
    report["onnx_decode"] = run.measure_onnx(model_dir)
    report["phases_reused"] = run.store.reused
    report["wall_seconds"] = time.perf_counter() - wall
    out = training_args.output_dir
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(out, "report.md"), format_lm_report(report))
    plot_lm_candidates(report, os.path.join(out, "report.png"))  # with matplotlib (the plot extra)
    return report


def lm_report(run: OptimizeLMRun, chosen: Candidate, tried: list[Candidate], met: bool,
              rows: dict[str, dict[str, Any]], model_dir: str, shape: dict[str, Any]) -> dict[str, Any]:
    opt, result = run.opt, rows["optimized"]
    target = {"params": opt.target_params, "speedup": opt.target_speedup,
              "achieved_params_ratio": result["params_ratio"], "achieved_decode_speedup": result["decode_speedup"]}
    if opt.target_params is not None:
        target["params_met"] = result["params_ratio"] <= opt.target_params
    if opt.target_speedup is not None:
        target["speedup_met"] = result["decode_speedup"] >= opt.target_speedup
    target["met"] = met and all(v for k, v in target.items() if k.endswith("_met"))
    return {
        "task": "causal-lm",
        "target": target,
        "chosen": {"axes": chosen.axes, "fraction_removed": chosen.fraction,
                   "layers_removed": run.importance_of(chosen).layers_gone,
                   "hidden_channels_removed": len(run.importance_of(chosen).channels_gone),
                   "search": "axes" if run.search_axes else "heads+neurons", **shape},
        "candidates": [asdict(c) for c in tried],
        "models": rows,
        "data": {"description": run.description, "train_tokens": int(run.train_ids.numel()),
                 "held_out_tokens": int(min(run.held_ids.numel(), opt.eval_tokens or run.held_ids.numel())),
                 "block_size": opt.block_size},
        "outputs": {"model": model_dir, "plain_config": run.plain_config},
        "settings": {"optimize": asdict(opt), "pruning_config": run.recovery_config.to_dict(),
                     "training_arguments": json.loads(run.training_args.to_json_string()),
                     "threads": torch.get_num_threads(), "processes": run.processes, "torch": torch.__version__},
        "phases": run.phases,
    }


def format_lm_report(report: dict[str, Any]) -> str:
    """report.md: the verdict, dense against the result, and the candidate shapes measured before training."""
    target, chosen, models = report["target"], report["chosen"], report["models"]
    goal = []
    if target["params"] is not None:
        goal.append(f"at most {target['params']:g} of the parameters")
    if target["speedup"] is not None:
        goal.append(f"{target['speedup']:g}x the dense decode tokens/s at batch 1")
    picked = next((Candidate(**c) for c in report["candidates"] if c["chosen"]), None)
    lines = [f"# hf-prune optimize (causal LM): {'met' if target['met'] else 'NOT MET'}", "",
             f"Target: {' and '.join(goal)}. Result ({chosen['axes']}): "
             + (picked.describe() if picked else f"{chosen['fraction_removed']:.0%} of heads and neurons removed")
             + (f" (layers {chosen['layers_removed']})" if chosen["layers_removed"] else "")
             + f": {target['achieved_params_ratio']:.2f} of the parameters, decode "
             f"{target['achieved_decode_speedup']:.2f}x.", ""]
    if not target["met"]:
        lines += ["**The target was not met**; the closest shape is reported. Allow more pruning (--max_fraction, "
                  "or the axis search, --search_axes) or relax the target.", ""]
    lines += [f"Text: {report['data']['description']}; perplexity over {report['data']['held_out_tokens']} held-out "
              f"tokens in windows of {report['data']['block_size']}. {report['settings']['threads']} threads.", ""]
    rows = [[name, f"{row['parameters'] / 1e6:.1f}M", f"{row['params_ratio']:.2f}",
             f"{row['perplexity']:.2f}" + (f" (after the cut: {row['perplexity_after_cut']:.2f})"
                                           if "perplexity_after_cut" in row else ""),
             f"{row['decode_tokens_per_s']:.1f}", f"{row['decode_speedup']:.2f}x", f"{row['prefill_ms']:.1f}"]
            for name, row in models.items()]
    lines += table(["model", "parameters", "of dense", "held-out perplexity", "decode tokens/s (b1)", "decode speedup",
                    "prefill ms"], rows)
    onnx = report.get("onnx_decode", {})
    if "skipped" in onnx:
        lines += ["", f"ONNX Runtime (key/value cache): not measured: {onnx['skipped']}"]
    elif onnx:
        lines += ["", "ONNX Runtime with the key/value cache (Optimum's export, greedy tokens checked against "
                  "PyTorch), batch 1:", ""]
        lines += table(["model", "decode tokens/s", "prefill ms"],
                       [[name, f"{onnx[name]['decode_tokens_per_s']:.1f}", f"{onnx[name]['prefill_ms']:.1f}"]
                        for name in ("dense", "optimized")])
        lines += ["", f"Decode speedup in ONNX Runtime: {onnx['decode_speedup']:.2f}x; graph: {onnx['graph']}."]
    lines += ["", "## Candidate shapes (cut from the dense model before training)", ""]
    if chosen.get("search") == "axes":
        lines += ["Each family's least pruning that meets the target is compared on held-out perplexity; the lowest "
                  "wins (ties go to width, searched first).", ""]
    lines += table(["axes", "removed", "of dense parameters", "decode speedup", "ppl after cut", "ppl after search",
                    "chosen"],
                   [[c["axes"], Candidate(**c).describe(), f"{c['params_ratio']:.2f}",
                     "-" if c["decode_speedup"] is None else f"{c['decode_speedup']:.2f}x",
                     "-" if c["perplexity_after_cut"] is None else f"{c['perplexity_after_cut']:.2f}",
                     "-" if c["perplexity_after_search"] is None else f"{c['perplexity_after_search']:.2f}",
                     "yes" if c["chosen"] else ""]
                    for c in report["candidates"]])
    return "\n".join(lines) + "\n"
