"""Finalising a pruned model: masks made permanent, and the files that travel with a checkpoint.

A checkpoint written here is a standard Transformers checkpoint (zeros stored in place) that
`AutoModelFor*.from_pretrained` loads without hf_prune, plus `pruning_config.json`, `sparsity_report.json` and a
model-card section that says what was done and what it does and does not buy at inference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import types
import weakref
from typing import Any, Optional

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import PruningConfig
from .files import atomic_write_text, staged_directory
from .masks import config_sparsity_report
from .pruner import STATE_NAME
from .structure import STRUCTURE_NAME, save_structure, structure_summary
from .torch_prune import check_no_torch_prune

REPORT_NAME = "sparsity_report.json"
CARD_NAME = "README.md"
CARD_BEGIN = "<!-- hf_prune:begin -->"
CARD_END = "<!-- hf_prune:end -->"
# Hub tags every pruned model carries (plus its method), so hf_prune models are findable on the Hub.
MODEL_TAGS = ("hf_prune", "pruning")


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight and remove the wrappers, in place; returns `model`.

    hf_prune itself keeps no wrappers (its zeros are already in the weights), but models pruned with
    `torch.nn.utils.prune` or a `parametrize` mask save non-standard keys (`weight_orig`, `parametrizations...`)
    that `from_pretrained` silently replaces with random weights. After this call the state dict is plain again.
    """
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def pruned_structure(model: nn.Module) -> Optional[dict]:
    """`structure_summary(model)` when heads, FFN neurons, layers or hidden channels were removed, else None (also
    for architectures hf_prune cannot restructure)."""
    try:
        summary = structure_summary(model)
    except ValueError:
        return None
    removed = ("pruned_heads", "pruned_neurons", "pruned_layers", "pruned_hidden")
    return summary if any(summary.get(key) for key in removed) else None


def _structure_lines(structure: Optional[dict]) -> list[str]:
    if structure is None:
        return []
    heads = sum(structure["heads_per_layer"])
    original = structure["num_attention_heads"] * structure["num_layers"]
    lines = [
        "",
        f"Structure was removed physically: {heads} of {original} attention heads remain "
        f"(per layer: {structure['heads_per_layer']}), FFN sizes per layer {structure['intermediate_sizes']}, "
        f"{structure['parameters']:,} parameters.",
    ]
    if structure.get("pruned_layers"):
        lines.append(f"{len(structure['pruned_layers'])} of {structure['original_num_layers']} layers were removed "
                     f"(original indices {structure['pruned_layers']}).")
    if structure.get("pruned_hidden"):
        lines.append(f"The hidden size went from {structure['original_hidden_size']} to {structure['hidden_size']}.")
    if structure["loads_with_from_pretrained"]:
        lines.append("The shapes are recorded in `config.pruned_heads`: plain `from_pretrained` loads it.")
    else:
        lines.append(
            "Transformers cannot express these shapes in its config; load with "
            "`hf_prune.load_pruned(path_or_repo_id)`, which rebuilds them from `hf_prune_structure.json`."
        )
    return lines


def model_card_section(config: PruningConfig, report: dict, structure: Optional[dict] = None) -> str:
    """Markdown describing the pruning, for the model card."""
    nonzero = report["targeted_params"] - report["zero_params"]
    model_nonzero = report["model_params"] - report["model_zero_params"]
    lines = [
        CARD_BEGIN,
        "## Pruning (hf_prune)",
        "",
        f"This model was pruned during fine-tuning with hf_prune using **{config.method}** "
        f"pruning, `{config.granularity}` granularity, `{config.scope}` ranking and a `{config.schedule}` schedule.",
        "",
        "| | value |",
        "|---|---|",
        f"| target sparsity | {config.target_sparsity:.1%} |",
        f"| measured sparsity of pruned layers | {report['global_sparsity']:.2%} |",
        f"| pruned layers | {len(report['modules'])} |",
        f"| non-zero weights in pruned layers | {nonzero:,} of {report['targeted_params']:,} |",
        f"| non-zero parameters in the model | {model_nonzero:,} of {report['model_params']:,} |",
        "",
        "The weights are stored densely with zeros in place: the checkpoint loads with plain "
        "`AutoModelFor*.from_pretrained`, no hf_prune needed. Scattered zeros make neither the file nor inference "
        "smaller or faster on their own; structured removal (heads, FFN neurons) and INT8 export are what pay at "
        "inference. `pruning_config.json` holds the full configuration and `sparsity_report.json` the per-layer "
        "sparsity.",
        *_structure_lines(structure),
        CARD_END,
        "",
    ]
    return "\n".join(lines)


def write_model_card_section(directory: str, section: str, begin: str = CARD_BEGIN, end: str = CARD_END) -> str:
    """Insert or replace the hf_prune section of `directory/README.md` (the text between `begin` and `end`, which
    `section` starts and ends with), keeping whatever else is there."""
    path = os.path.join(directory, CARD_NAME)
    existing = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            existing = handle.read()
    if begin in existing and end in existing:
        head, rest = existing.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + tail
    elif existing:
        text = existing.rstrip("\n") + "\n\n" + section
    else:
        text = "---\nlibrary_name: transformers\ntags:\n" + "".join(f"- {t}\n" for t in MODEL_TAGS) + "---\n\n" + section
    atomic_write_text(path, text)
    return path


RESULTS_BEGIN = "<!-- hf_prune:results:begin -->"
RESULTS_END = "<!-- hf_prune:results:end -->"


def results_card_section(rows: dict[str, dict[str, float]], data: str) -> str:
    """Markdown of test results for the model card: {model name: {"accuracy": .., "macro_f1": ..}} on `data`."""
    lines = [RESULTS_BEGIN, "## Test results", "", f"Scored on {data}.", "", "| model | accuracy | macro-F1 |",
             "|---|---|---|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} |")
    return "\n".join(lines + [RESULTS_END, ""])


def write_results_card_section(directory: str, rows: dict[str, dict[str, float]], data: str) -> str:
    """Insert or replace the test-results section of `directory/README.md` (see `results_card_section`)."""
    return write_model_card_section(directory, results_card_section(rows, data), RESULTS_BEGIN, RESULTS_END)


def add_results_to_model_card(trainer: Any, rows: dict[str, dict[str, float]], data: str) -> None:
    """Make `trainer.create_model_card` (which `push_to_hub` calls too) also write the test-results section.

    Trainer's own card lists only `eval_*` results of the validation split; a pruned model's reader wants its test
    accuracy next to the dense model's. Set on the instance, so it holds for a plain Trainer as for PruningTrainer.
    """
    create = trainer.create_model_card

    def create_model_card(*args: Any, **kwargs: Any) -> None:
        create(*args, **kwargs)
        if trainer.is_world_process_zero():
            write_results_card_section(trainer.args.output_dir, rows, data)

    trainer.create_model_card = create_model_card


def save_pruning_artifacts(
    directory: str, model: nn.Module, config: PruningConfig, write_card: bool = True
) -> Optional[dict]:
    """Write `pruning_config.json`, `sparsity_report.json` and (optionally) the model-card section next to weights."""
    os.makedirs(directory, exist_ok=True)
    report = config_sparsity_report(model, config)
    atomic_write_text(os.path.join(directory, "pruning_config.json"), config.to_json_string())
    atomic_write_text(os.path.join(directory, REPORT_NAME), json.dumps(report, indent=2) + "\n")
    structure = pruned_structure(model)
    if structure is not None:
        save_structure(model, directory)
    if write_card:
        write_model_card_section(directory, model_card_section(config, report, structure))
    return report


def model_tags(config: PruningConfig) -> list[str]:
    """The Hub tags of a model pruned with `config`: hf_prune, pruning and the method."""
    return [*MODEL_TAGS, config.method]


# What a model save writes and a new save must not inherit from an earlier one in the same folder: weights (a
# sharded save leaves no single file to overwrite) and hf_prune's own files, which must describe these weights.
_SAVE_OWNED = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin|"
    r"pytorch_model\.bin\.index\.json|config\.json|generation_config\.json|pruning_config\.json|"
    rf"{re.escape(REPORT_NAME)}|{re.escape(STRUCTURE_NAME)}|{re.escape(STATE_NAME)})$"
)


def _save_pretrained_with_artifacts(self, save_directory, *args, **kwargs):
    # Bound to one model instance by `carry_artifacts`; the class's own save_pretrained does the saving.
    check_no_torch_prune(self, f"save {save_directory}")
    save = type(self).save_pretrained
    if not kwargs.get("is_main_process", True):
        return save(self, save_directory, *args, **kwargs)
    pruner = self.hf_prune_pruner() if getattr(self, "hf_prune_pruner", None) is not None else None
    # Trainer rotates old checkpoints right after writing this one, before any callback's on_save: the pruning
    # state must be in the checkpoint by then, or a crash leaves none with it.
    checkpoint = os.path.basename(os.path.normpath(str(save_directory))).startswith(f"{PREFIX_CHECKPOINT_DIR}-")
    if kwargs.get("push_to_hub"):
        # save_pretrained pushes from the folder it is given (and names the repo after it): no staging here.
        result = save(self, save_directory, *args, **kwargs)
        save_pruning_artifacts(str(save_directory), self, self.hf_prune_config)
        return result
    # Weights, config and hf_prune's files appear together or not at all: written to a staging folder that then
    # replaces the target in one rename; what else the target held (checkpoints, logs, a tokenizer) is kept.
    with staged_directory(str(save_directory), carry_over=lambda name: not _SAVE_OWNED.match(name)) as staging:
        card = os.path.join(str(save_directory), CARD_NAME)
        if os.path.isfile(card):
            shutil.copy2(card, os.path.join(staging, CARD_NAME))  # our section is replaced in it, the rest kept
        result = save(self, staging, *args, **kwargs)
        save_pruning_artifacts(staging, self, self.hf_prune_config)
        if pruner is not None and checkpoint:
            pruner.save(staging)
    return result


def carry_artifacts(model: nn.Module, config: PruningConfig, pruner: Optional[Any] = None) -> None:
    """Make every `model.save_pretrained(directory)` also write the pruning artifacts into that directory, and tag the
    model for the Hub.

    Trainer saves through `model.save_pretrained` in `save_model`, in checkpoints and in `push_to_hub`, so a plain
    `Trainer` with a pruning callback writes `pruning_config.json`, `sparsity_report.json` and the model-card section
    wherever it saves, as `PruningTrainer` does. Only this instance changes (a bound method, which `copy.deepcopy`
    rebinds to the copy); models without `save_pretrained` are left alone. With `pruner`, a save into a Trainer
    checkpoint folder (`checkpoint-N`) also writes its state (`hf_prune_state.pt`).
    """
    if not hasattr(type(model), "save_pretrained"):
        return
    model.hf_prune_config = config
    # A weak reference: the model must not keep its pruner alive, and copy.deepcopy(model) must not copy the pruner.
    model.hf_prune_pruner = weakref.ref(pruner) if pruner is not None else None
    model.save_pretrained = types.MethodType(_save_pretrained_with_artifacts, model)
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(model_tags(config))
