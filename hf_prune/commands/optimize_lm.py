"""`hf-prune optimize` on a causal LM: a smaller dense decoder, aimed at a parameter or decode-speed target.

    hf-prune optimize --model_name_or_path my-llama --train_file train.txt --validation_file held_out.txt \\
        --target_params 0.6 --max_steps 200 --output_dir outputs/optimize-lm

The road Minitron describes (Muralidharan et al. 2024), on a Hugging Face checkpoint and `Trainer`:

1. importance from calibration text, once: attention heads (whole key/value groups), FFN neurons and hidden channels
   by the registered criteria (`--importance`; activation norms by default), layers by block influence;
2. the shape: the least fraction of heads and neurons removed (with `--hidden_fraction` of the width and
   `--layers_to_remove` layers in every candidate) that keeps at most `--target_params` of the parameters, or that
   decodes `--target_speedup` times faster than the dense model at batch 1 on this machine; candidates are cut from
   the dense model and timed before any training;
3. the cut, then recovery: `PruningTrainer` distils the cut model from the dense one (KL on the logits plus the LM
   loss, `--distillation_alpha`) on windows of the training text; every `TrainingArguments` flag applies;
4. measured on held-out text: perplexity of the dense, cut and recovered models, parameters, decode tokens/s and
   prefill latency in PyTorch (one interleaved run);
5. `OUT/model` (reloads with `load_pruned`; `generate()` with the key/value cache) and `OUT/report.md|json`.

Text: `--train_file` / `--validation_file` (.txt: documents separated by blank lines, or one per line when there
are none; .json/.jsonl/.csv with `--text_columns`), a Hub dataset (`--dataset_name`), or, without either, the
packaged BBC News articles (`hf_prune.recipes.packaged_lm`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, TrainingArguments, default_data_collator
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from ..config import PruningConfig
from ..data import DataArguments
from ..files import atomic_write_text, staged_directory
from ..latency import fraction_grid
from ..perplexity import evaluate_perplexity
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
from .shapes import Importance, cut, score_structures

logger = logging.get_logger(__name__)

def is_causal_lm(model_name_or_path: str) -> bool:
    """Whether the checkpoint is a causal LM, read from its config (architectures, else the model type)."""
    config = AutoConfig.from_pretrained(model_name_or_path)
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a in names or a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.is_encoder_decoder


# ------------------------------------------------------------------------------------------------------- text
def read_documents(path: str, text_column: str, option: str = "--text_columns") -> list[str]:
    """The documents of a local file: .txt split at blank lines (or at lines when there are none); .json, .jsonl
    and .csv read with `datasets`, one document per row of `text_column`."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        parts = [p.strip() for p in text.split("\n\n")] if "\n\n" in text else text.splitlines()
        return [p for p in (p.strip() for p in parts) if p]
    import datasets

    kind = {"json": "json", "jsonl": "json", "csv": "csv"}.get(path.rsplit(".", 1)[-1].lower())
    if kind is None:
        raise ValueError(f"{path!r}: give a .txt, .json, .jsonl or .csv file of text.")
    rows = datasets.load_dataset(kind, data_files=path, split="train")
    if text_column not in rows.column_names:
        raise ValueError(f"{option} {text_column!r} is not a column of {path!r}; it has {rows.column_names}.")
    return [t for t in rows[text_column] if t]


def load_text(data_args: DataArguments) -> tuple[list[str], list[str], str]:
    """(training documents, held-out documents, where they came from)."""
    column = (data_args.text_columns or ["text"])[0]
    if data_args.train_file:
        if not data_args.validation_file:
            raise ValueError("--train_file without --validation_file: perplexity must be measured on text the "
                             "recovery did not train on; give --validation_file too.")
        return (read_documents(data_args.train_file, column), read_documents(data_args.validation_file, column),
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


# ----------------------------------------------------------------------------------------------------- timing
@torch.inference_mode()
def decode_timings(models: dict[str, torch.nn.Module], prompt: torch.Tensor, new_tokens: int,
                   rounds: int) -> dict[str, dict[str, float]]:
    """Prefill latency (ms, one forward pass over `prompt`) and decode speed (tokens/s after the prefill, greedy,
    with the key/value cache) of each model at batch 1, interleaved round by round; medians over the rounds."""
    measured: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "generate": []} for name in models}
    mask = torch.ones_like(prompt)
    # pad_token_id only silences generate's warning: a batch of one prompt has no padding.
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
    for model in models.values():  # warm-up: first calls allocate
        model.generate(input_ids=prompt, attention_mask=mask, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=prompt, attention_mask=mask)
            measured[name]["prefill"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(input_ids=prompt, attention_mask=mask, **kwargs)
            measured[name]["generate"].append(time.perf_counter() - start)
    result = {}
    for name, times in measured.items():
        prefill, generate = statistics.median(times["prefill"]), statistics.median(times["generate"])
        result[name] = {"prefill_ms": prefill * 1000, "decode_tokens_per_s": new_tokens / max(generate - prefill, 1e-9)}
    return result


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


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ phases
@dataclass
class Candidate:
    """One shape cut from the dense model before training: its fraction, size and (when timed) speed."""

    fraction: float
    params_ratio: float
    decode_speedup: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None
    prefill_ms: Optional[float] = None


class OptimizeLMRun:
    """One `hf-prune optimize` run on a causal LM, in phases: score, search, cut, recover, measure, report."""

    def __init__(self, opt: Any, pruning_config: PruningConfig, training_args: TrainingArguments,
                 data_args: DataArguments) -> None:
        self.opt, self.training_args = opt, training_args
        self.recovery_config = dataclasses.replace(pruning_config, head_sparsity=0.0, neuron_sparsity=0.0)
        self.out = training_args.output_dir
        self.phases: dict[str, float] = {}
        self.tokenizer = AutoTokenizer.from_pretrained(opt.model_name_or_path)
        self.dense = load_pruned(opt.model_name_or_path).float().eval()
        train_docs, held_docs, self.description = load_text(data_args)
        self.train_ids, self.held_ids = token_ids(self.tokenizer, train_docs), token_ids(self.tokenizer, held_docs)
        self.windows = Windows(self.train_ids, opt.block_size)
        self.prompt = self.held_ids[: opt.prompt_tokens].unsqueeze(0)
        self.found: Optional[Importance] = None

    def perplexity(self, model: torch.nn.Module) -> float:
        return evaluate_perplexity(model.eval(), input_ids=self.held_ids, window=self.opt.block_size,
                                   max_tokens=self.opt.eval_tokens or None).perplexity

    def score(self) -> None:
        """Importance of heads, neurons, layers and hidden channels on calibration windows of the training text."""
        start = time.perf_counter()
        calibration = DataLoader(self.windows, batch_size=self.training_args.per_device_train_batch_size,
                                 shuffle=True, generator=torch.Generator().manual_seed(self.training_args.seed),
                                 collate_fn=default_data_collator)
        self.found = score_structures(self.dense, calibration, self.opt)
        self.phases["importance_seconds"] = time.perf_counter() - start

    def shaped(self, fraction: float) -> torch.nn.Module:
        """The dense model with `fraction` of heads and neurons removed, and the chosen layers and channels."""
        return cut(self.dense, self.found, fraction, prune_uniformly if self.opt.uniform_layers else None).eval()

    def search(self) -> tuple[Candidate, list[Candidate], bool]:
        """The least pruning that meets the target, from candidates cut and measured before any training."""
        opt, start = self.opt, time.perf_counter()
        dense_params = parameters(self.dense)
        tried, chosen = [], None
        for fraction in fraction_grid(opt.fraction_step, opt.max_fraction):
            model = self.shaped(fraction)
            candidate = Candidate(fraction, parameters(model) / dense_params)
            if opt.target_speedup is not None:
                timing = decode_timings({"dense": self.dense, "candidate": model}, self.prompt, opt.decode_tokens,
                                        opt.timing_rounds)
                candidate.decode_tokens_per_s = timing["candidate"]["decode_tokens_per_s"]
                candidate.prefill_ms = timing["candidate"]["prefill_ms"]
                candidate.decode_speedup = candidate.decode_tokens_per_s / timing["dense"]["decode_tokens_per_s"]
            tried.append(candidate)
            logger.info(f"candidate: {fraction:.0%} of heads and neurons removed, {candidate.params_ratio:.2f} of the "
                        "parameters" + (f", decode {candidate.decode_speedup:.2f}x" if candidate.decode_speedup else ""))
            if self.meets(candidate):
                chosen = candidate
                break
        met = chosen is not None
        if chosen is None:
            chosen = tried[-1]
            logger.warning(f"hf_prune optimize: even {chosen.fraction:.0%} of heads and neurons removed does not meet "
                           "the target: continuing with that closest shape.")
        self.phases["search_seconds"] = time.perf_counter() - start
        return chosen, tried, met

    def meets(self, candidate: Candidate) -> bool:
        opt = self.opt
        if opt.target_params is not None and candidate.params_ratio > opt.target_params:
            return False
        if opt.target_speedup is not None and candidate.decode_speedup < opt.target_speedup * (1 + opt.speedup_margin):
            return False
        return True

    def recover(self, model: torch.nn.Module) -> PruningTrainer:
        """Distil the cut model from the dense one on the training windows (every TrainingArguments flag applies)."""
        start = time.perf_counter()
        args = dataclasses.replace(arm_training_arguments(self.training_args, "recovery"), push_to_hub=False)
        logger.info(f"recovery: {args.max_steps} steps at lr {args.learning_rate:g} on {len(self.windows)} windows of "
                    f"{self.opt.block_size} tokens{', distilled from the dense model' if self.opt.distill else ''}")
        trainer = PruningTrainer(model=model.train(), args=args, pruning_config=self.recovery_config,
                                 teacher_model=self.dense if self.opt.distill else None, train_dataset=self.windows,
                                 data_collator=default_data_collator)
        trainer.train()
        self.phases["recovery_seconds"] = time.perf_counter() - start
        return trainer

    def save(self, trainer: PruningTrainer) -> str:
        model_dir = os.path.join(self.out, "model")
        with staged_directory(model_dir) as staging:
            trainer.save_model(staging)
            self.tokenizer.save_pretrained(staging)
            if self.opt.uniform_layers:
                write_uniform_config(staging, trainer.model)
        return model_dir

    def measure(self, models: dict[str, torch.nn.Module]) -> dict[str, dict[str, Any]]:
        """Parameters, held-out perplexity, decode tokens/s and prefill ms of each model (timed in one run)."""
        start = time.perf_counter()
        timings = decode_timings({k: m.eval() for k, m in models.items()}, self.prompt, self.opt.decode_tokens,
                                 self.opt.benchmark_rounds)
        dense_speed = timings["dense"]["decode_tokens_per_s"]
        rows = {}
        for name, model in models.items():
            rows[name] = {"parameters": parameters(model), "params_ratio": parameters(model) / parameters(self.dense),
                          "perplexity": self.perplexity(model), **timings[name],
                          "decode_speedup": timings[name]["decode_tokens_per_s"] / dense_speed}
        self.phases["benchmark_seconds"] = time.perf_counter() - start
        return rows


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
    os.makedirs(training_args.output_dir, exist_ok=True)
    run = OptimizeLMRun(opt, pruning_config, training_args, data_args)
    run.score()
    chosen, tried, met = run.search()
    cut = run.shaped(chosen.fraction)
    cut_perplexity = run.perplexity(cut)
    trainer = run.recover(copy.deepcopy(cut))
    model_dir = run.save(trainer)
    rows = run.measure({"dense": run.dense, "optimized": trainer.model})
    rows["optimized"]["perplexity_after_cut"] = cut_perplexity
    summary = structure_summary(trainer.model)
    shape = {k: summary[k] for k in ("heads_per_layer", "intermediate_sizes", "num_layers", "hidden_size")}
    report = lm_report(run, chosen, tried, met, rows, model_dir, shape)
    report["wall_seconds"] = time.perf_counter() - wall
    atomic_write_text(os.path.join(training_args.output_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(training_args.output_dir, "report.md"), format_lm_report(report))
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
        "chosen": {"fraction_removed": chosen.fraction, "layers_removed": run.found.layers_gone,
                   "hidden_channels_removed": len(run.found.channels_gone), **shape},
        "candidates": [asdict(c) for c in tried],
        "models": rows,
        "data": {"description": run.description, "train_tokens": int(run.train_ids.numel()),
                 "held_out_tokens": int(min(run.held_ids.numel(), opt.eval_tokens or run.held_ids.numel())),
                 "block_size": opt.block_size},
        "outputs": {"model": model_dir},
        "settings": {"optimize": asdict(opt), "pruning_config": run.recovery_config.to_dict(),
                     "training_arguments": json.loads(run.training_args.to_json_string()),
                     "threads": torch.get_num_threads(), "torch": torch.__version__},
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
    lines = [f"# hf-prune optimize (causal LM): {'met' if target['met'] else 'NOT MET'}", "",
             f"Target: {' and '.join(goal)}. Result: {chosen['fraction_removed']:.0%} of attention heads and FFN "
             f"neurons removed" + (f", layers {chosen['layers_removed']}" if chosen["layers_removed"] else "")
             + (f", {chosen['hidden_channels_removed']} hidden channels" if chosen["hidden_channels_removed"] else "")
             + f": {target['achieved_params_ratio']:.2f} of the parameters, decode "
             f"{target['achieved_decode_speedup']:.2f}x.", ""]
    if not target["met"]:
        lines += ["**The target was not met**; the closest shape is reported. Allow more pruning (--max_fraction, "
                  "--layers_to_remove, --hidden_fraction) or relax the target.", ""]
    lines += [f"Text: {report['data']['description']}; perplexity over {report['data']['held_out_tokens']} held-out "
              f"tokens in windows of {report['data']['block_size']}. {report['settings']['threads']} threads.", ""]
    rows = [[name, f"{row['parameters'] / 1e6:.1f}M", f"{row['params_ratio']:.2f}",
             f"{row['perplexity']:.2f}" + (f" (after the cut: {row['perplexity_after_cut']:.2f})"
                                           if "perplexity_after_cut" in row else ""),
             f"{row['decode_tokens_per_s']:.1f}", f"{row['decode_speedup']:.2f}x", f"{row['prefill_ms']:.1f}"]
            for name, row in models.items()]
    lines += table(["model", "parameters", "of dense", "held-out perplexity", "decode tokens/s (b1)", "decode speedup",
                    "prefill ms"], rows)
    lines += ["", "## Candidate shapes (cut from the dense model before training)", ""]
    lines += table(["heads+neurons removed", "of dense parameters", "decode speedup"],
                   [[f"{c['fraction']:.0%}", f"{c['params_ratio']:.2f}",
                     "-" if c["decode_speedup"] is None else f"{c['decode_speedup']:.2f}x"]
                    for c in report["candidates"]])
    return "\n".join(lines) + "\n"
