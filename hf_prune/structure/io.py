"""Saving and reloading structurally pruned models.

Transformers can rebuild a smaller model from its config alone only in two cases: whole layers removed
(`config.num_hidden_layers`), and Transformers 4.x head pruning of a model that implements `prune_heads`, no layer
left without heads (`config.pruned_heads`). Then plain `AutoModelFor*.from_pretrained` reloads it. Every other case
(FFN neurons, hidden channels, Transformers 5.x, which ignores `config.pruned_heads`, Llama-style models, layers
without heads) needs `load_pruned`, which builds the model at its original depth and width, then removes what the
structure record lists: the record kept in `config.json` (`config.hf_prune_structure`, written by every
`save_pretrained`), `hf_prune_structure.json` (written by `save_structure`) and `config.pruned_heads` when a 4.x
checkpoint has it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import torch
import transformers
from torch import nn
from transformers.utils import logging

from ..files import atomic_write_text, staged_directory
from .depth import prune_layers
from .experts import prune_experts
from .record import CONFIG_ATTR, read_record, structure_record
from .removal import prune_ffn_neurons, prune_heads
from .standins import ExactLayerNorm, ExactRMSNorm
from .summary import int_keys, structure_summary
from .width import prune_hidden

logger = logging.get_logger(__name__)

STRUCTURE_NAME = "hf_prune_structure.json"

def save_structure(model: nn.Module, directory: str) -> str:
    """Write `hf_prune_structure.json` (heads and neurons removed per layer, resulting sizes) into `directory`.

    Call it next to `model.save_pretrained(directory)`; `load_pruned(directory)` reads it back. Returns its path.
    """
    from ..version import __version__

    summary = structure_summary(model)
    # The record's keys win: head and neuron lists keyed by ORIGINAL layer index, as `load_pruned` reads them.
    record = structure_record(model) or {"format_version": 1, "pruned_heads": {}, "pruned_neurons": {}}
    payload = {
        "format_version": record["format_version"],
        "hf_prune_version": __version__,
        "transformers_version": transformers.__version__,
        **summary,
        **record,
    }
    return atomic_write_text(os.path.join(directory, STRUCTURE_NAME), json.dumps(payload, indent=2) + "\n")


def save_pruned(model: nn.Module, directory: str, **save_pretrained_kwargs: Any) -> str:
    """`model.save_pretrained(directory, ...)` plus `save_structure`.

    Plain `save_pretrained` alone is enough for `load_pruned` (the structure is recorded in `config.json`); the JSON
    file is a readable summary beside it. Weights, config and summary appear together or not at all (staged, then
    one rename): a save that fails, for lack of space or anything else, leaves an earlier save in `directory` whole;
    other files there (a tokenizer, logs) are kept.
    """
    if save_pretrained_kwargs.get("push_to_hub"):  # save_pretrained pushes from the folder it is given
        model.save_pretrained(directory, **save_pretrained_kwargs)
        return save_structure(model, directory)
    with staged_directory(directory, carry_over=lambda name: not _MODEL_FILES.match(name)) as staging:
        model.save_pretrained(staging, **save_pretrained_kwargs)
        save_structure(model, staging)
    return os.path.join(directory, STRUCTURE_NAME)


# What a model save writes and must not inherit from an earlier save in the same folder (a sharded save leaves no
# single weight file to overwrite).
_MODEL_FILES = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                          r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json|config\.json|"
                          rf"generation_config\.json|{re.escape(STRUCTURE_NAME)})$")


_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
_BUILD_KWARGS = ("dtype", "torch_dtype", "attn_implementation")


def resolve_directory(path_or_repo_id: str, hub_kwargs: Optional[dict] = None) -> str:
    """A local folder for a model given as a folder or a Hub id (its json and safetensors files, downloaded once)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.exists(path_or_repo_id):
        raise FileNotFoundError(
            f"hf_prune.load_pruned: {path_or_repo_id!r} is a file, not a folder; give the folder save_pretrained wrote "
            "(config.json and model.safetensors) or a Hub repo id."
        )
    # A Hub id is `name` or `namespace/name`: anything with more parts, or written as a path, is a missing folder.
    written_as_path = path_or_repo_id.startswith(("./", "../", "~")) or "\\" in path_or_repo_id
    if path_or_repo_id.count("/") > 1 or os.path.isabs(path_or_repo_id) or written_as_path:
        raise FileNotFoundError(
            f"hf_prune.load_pruned: the folder {path_or_repo_id!r} does not exist; give the folder save_pretrained "
            "wrote (config.json and model.safetensors) or a Hub repo id."
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            path_or_repo_id, allow_patterns=["*.json", "*.safetensors"], **(hub_kwargs or {})
        )
    except Exception as err:  # invalid id, offline without a cached copy, no such repo, no access
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"hf_prune.load_pruned: {path_or_repo_id!r} is not a local folder, and as a Hub repo id it could not be "
            f"fetched ({type(err).__name__}: {reason}). Give the folder save_pretrained wrote, or a Hub repo id that "
            "is cached or reachable (HF_HUB_OFFLINE=1 allows only cached ones)."
        ) from None


def _read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return _load_safetensors_file(single)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"hf_prune.load_pruned: {index} is not a safetensors index (a JSON object with a "
                             f"'weight_map' of tensor name: shard file) ({type(err).__name__}: {err}).") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_safetensors_file(os.path.join(directory, shard)))
        return state
    raise FileNotFoundError(
        f"hf_prune.load_pruned: no model.safetensors (or model.safetensors.index.json) in {directory!r}; save the "
        "model with save_pretrained(..., safe_serialization=True)."
    )


def _load_safetensors_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"hf_prune.load_pruned: the weight file {path!r} is missing.")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged header
        raise ValueError(f"hf_prune.load_pruned: {path} could not be read as safetensors ({err}); it is truncated "
                         "or not a safetensors file: save the model again.") from None


def _read_config(directory: str) -> Any:
    """`AutoConfig` of `directory`, with a missing or damaged config.json named as such."""
    from transformers import AutoConfig

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hf_prune.load_pruned: no config.json in {directory!r}; give the folder "
                                "save_pretrained wrote (config.json and model.safetensors).")
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"hf_prune.load_pruned: {path} is not valid JSON ({err}); it is truncated or was edited: "
                         "save the model again.") from None
    try:
        return AutoConfig.from_pretrained(directory)
    except OSError as err:
        raise ValueError(f"hf_prune.load_pruned: {path} could not be read as a Transformers config ({err}).") from None


def _model_class(config: Any, model_class: Optional[type]) -> type:
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(
        f"hf_prune.load_pruned: the config names no model class this Transformers version provides "
        f"(architectures={architectures}); pass model_class=, e.g. AutoModelForSequenceClassification."
    )


def to_model_format(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint `state` with Transformers 5's saving conversions undone, keyed as `model.state_dict()`.

    Transformers 5 renames, fuses and splits weights when it loads (ViT's `attention.attention.query` becomes
    `attention.q_proj`, GPT-NeoX's `embed_out` becomes `lm_head`, per-expert MoE weights become one tensor) and
    reverts all of it when it saves. The conversion is a rearrangement of elements, so it is undone exactly by
    sending the model's element positions through the same saving conversion and reading back where each checkpoint
    element belongs. A state already in the model's format, and Transformers 4, are returned unchanged.
    """
    expected = model.state_dict()
    if set(state) <= set(expected):
        return state
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # Transformers 4 saves what the model holds
        return state
    positions: dict[str, torch.Tensor] = {}
    offset = 0
    for name, tensor in expected.items():
        positions[name] = torch.arange(offset, offset + tensor.numel(), dtype=torch.float64).view(tensor.shape)
        offset += tensor.numel()
    try:
        saved = revert_weight_conversion(model, dict(positions))
    except Exception:  # a conversion that cannot run on this model: report the keys as they are
        return state
    if set(saved) != set(state) or any(saved[k].shape != state[k].shape for k in state):
        return state
    flat = torch.empty(offset, dtype=torch.float64)
    filled = torch.zeros(offset, dtype=torch.bool)
    for key, where in saved.items():
        index = where.reshape(-1).long()
        flat[index] = state[key].reshape(-1).double()
        filled[index] = True
    result = {}
    for name, where in positions.items():
        index = where.reshape(-1).long()
        if bool(filled[index].all()):
            result[name] = flat[index].view(where.shape).to(expected[name].dtype)
    return result


def _load_state_strictly(model: nn.Module, state: dict[str, torch.Tensor], directory: str) -> None:
    state = to_model_format(model, state)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    # Tied parameters (an LM head sharing the embedding) are saved once, under one of their names.
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    aliases = {name: names for names in names_of.values() for name in names}
    missing = sorted(
        k for k in set(expected) - set(state) if not any(alias in state for alias in aliases.get(k, []))
    )
    if unexpected or mismatched or missing:
        recorded = os.path.isfile(os.path.join(directory, STRUCTURE_NAME)) or bool(getattr(model.config, CONFIG_ATTR, None))
        details = [] if recorded else [f"no structure record found (neither {STRUCTURE_NAME} nor config.{CONFIG_ATTR})"]
        if mismatched:
            details.append(f"shape mismatches: {mismatched[:8]}")
        if missing:
            details.append(f"missing from the checkpoint: {missing[:8]}")
        if unexpected:
            details.append(f"not in the rebuilt model: {unexpected[:8]}")
        raise ValueError(
            f"hf_prune.load_pruned: the weights in {directory!r} do not fit the model rebuilt from its config and "
            f"its structure record ({'; '.join(details)}). The record (config.{CONFIG_ATTR}, {STRUCTURE_NAME} or "
            "config.pruned_heads) must describe these weights: save the pruned model with save_pretrained or "
            "hf_prune.save_pruned after the heads and neurons were removed, and load with "
            "the model class that was saved."
        )
    model.load_state_dict(state, strict=False)


def _kept_layers(config: Any, structure: dict, directory: str) -> list[int]:
    """ORIGINAL indices of the layers in the checkpoint, in order."""
    stacks = structure.get("original_stack_layers") or {}
    saved = sum(int(getattr(config, field)) for field in stacks) if stacks else int(config.num_hidden_layers)
    if not structure.get("pruned_layers"):
        return list(range(saved))
    removed = set(structure["pruned_layers"])
    kept = [i for i in range(structure["original_num_layers"]) if i not in removed]
    if len(kept) != saved:
        raise ValueError(
            f"hf_prune.load_pruned: the structure record of {directory!r} keeps {len(kept)} of "
            f"{structure['original_num_layers']} layers but config.num_hidden_layers={saved}; the structure record "
            "does not belong to this config."
        )
    return kept


def _restore_original_sizes(config: Any, structure: dict, kept_layers: list[int]) -> None:
    """Set the config back to the unpruned depth and width, which the pruning calls then remove again."""
    if structure.get("pruned_layers") and structure.get("original_stack_layers"):
        for field, count in structure["original_stack_layers"].items():
            setattr(config, field, count)
    elif structure.get("pruned_layers"):
        original = structure["original_num_layers"]
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(kept_layers):
            # Removed layers are dropped again right after the build: any valid type will do for them.
            full = [layer_types[0]] * original
            for pos, layer in enumerate(kept_layers):
                full[layer] = layer_types[pos]
            config.layer_types = full
        config.num_hidden_layers = original
    if structure.get("pruned_hidden"):
        config.hidden_size = structure["original_hidden_size"]


def load_pruned(
    path_or_repo_id: str, model_class: Optional[type] = None, **from_pretrained_kwargs: Any
) -> nn.Module:
    """Load a structurally pruned checkpoint: rebuild the shapes, then load the weights strictly.

    The model is built from `config.json` (class from `config.architectures` when `model_class` is None) at the
    depth and hidden size it had before pruning; the heads and neurons recorded in the config, in
    `hf_prune_structure.json` and in `config.pruned_heads` (what Transformers 4.x writes, which 5.x ignores) are
    removed, then the recorded layers and hidden channels (with exact-statistics norms if they were used), and the
    safetensors weights are loaded; any missing, unexpected or mis-shaped
    tensor raises a ValueError. Works for checkpoints saved under Transformers 4.x and 5.x alike.

    Args:
        path_or_repo_id: a local directory or a Hub repo id.
        model_class: a Transformers model class or Auto class; default from `config.architectures`.
        from_pretrained_kwargs: `revision`, `cache_dir`, `token`, `local_files_only`, `force_download` (Hub);
            `dtype` (or `torch_dtype`), `attn_implementation` (model).

    Returns:
        The model in eval mode, as `from_pretrained` returns it.
    """
    unknown = sorted(set(from_pretrained_kwargs) - set(_HUB_KWARGS) - set(_BUILD_KWARGS))
    if unknown:
        raise TypeError(
            f"hf_prune.load_pruned got unsupported arguments {unknown}; supported: {list(_HUB_KWARGS + _BUILD_KWARGS)}."
        )
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    build_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _BUILD_KWARGS}
    directory = resolve_directory(str(path_or_repo_id), hub_kwargs)

    config = _read_config(directory)
    structure_path = os.path.join(directory, STRUCTURE_NAME)
    from_file: dict = {}
    if os.path.isfile(structure_path):
        try:
            with open(structure_path, encoding="utf-8") as handle:
                from_file = read_record(json.load(handle), structure_path)
        except json.JSONDecodeError as err:
            raise ValueError(f"hf_prune.load_pruned: {structure_path} is not valid JSON ({err}).") from None
    from_config = read_record(getattr(config, CONFIG_ATTR, None), f"{directory}/config.json ({CONFIG_ATTR})")
    structure = {**from_config, **from_file}
    pruned_layers = structure.get("pruned_layers", [])
    pruned_hidden = structure.get("pruned_hidden", [])
    kept_layers = _kept_layers(config, structure, directory)
    heads: dict[int, list[int]] = {}
    neurons: dict[int, list[int]] = {}
    # config.pruned_heads (Transformers' field) is keyed by position in the saved layer list; the record by
    # original layer index.
    config_heads = int_keys(getattr(config, "pruned_heads", None) or {})
    if any(not 0 <= k < len(kept_layers) for k in config_heads):
        raise ValueError(
            f"hf_prune.load_pruned: config.pruned_heads of {directory!r} names layers {sorted(config_heads)} but the "
            f"checkpoint has {len(kept_layers)} layers."
        )
    config_heads = {kept_layers[k]: v for k, v in config_heads.items()}
    for source in (from_config, from_file, {"pruned_heads": config_heads}):
        for layer, units in source.get("pruned_heads", {}).items():
            heads[layer] = sorted(set(heads.get(layer, [])) | set(units))
        for layer, units in source.get("pruned_neurons", {}).items():
            neurons[layer] = sorted(set(neurons.get(layer, [])) | set(units))
    if isinstance(getattr(config, "pruned_heads", None), dict):
        # Build unpruned (4.x would otherwise apply config.pruned_heads itself, and crash on layers without heads);
        # prune_heads below records them again.
        config.pruned_heads = {}
    if hasattr(config, CONFIG_ATTR):
        delattr(config, CONFIG_ATTR)  # rebuilt from the model by the pruning calls below
    _restore_original_sizes(config, structure, kept_layers)

    cls = _model_class(config, model_class)
    if cls.__name__.startswith("Auto"):
        model = cls.from_config(config, **build_kwargs)
    else:
        model = cls._from_config(config, **build_kwargs)
    norm_elements = structure.get("norm_elements")
    try:
        # Heads and neurons first, while the layers still have their original indices.
        prune_heads(model, heads)
        prune_experts(model, structure.get("pruned_experts", {}))
        prune_ffn_neurons(model, neurons)
        prune_layers(model, pruned_layers)
        prune_hidden(model, pruned_hidden, exact=norm_elements is not None)
    except ValueError as err:  # the pruning calls name the layer or unit; say where the list came from
        raise ValueError(
            f"hf_prune.load_pruned: the structure record of {directory!r} (config.{CONFIG_ATTR}, {STRUCTURE_NAME} or "
            f"config.pruned_heads) does not fit its config.json: {err}"
        ) from None
    if norm_elements is not None:
        for module in model.modules():
            if isinstance(module, (ExactLayerNorm, ExactRMSNorm)):
                module.elements = norm_elements
    if structure:
        summary = structure_summary(model)
        for key in ("heads_per_layer", "intermediate_sizes", "experts_per_layer", "num_layers", "hidden_size",
                    "norm_elements"):
            if key in structure and structure[key] != summary[key]:
                raise ValueError(
                    f"hf_prune.load_pruned: the structure record of {directory!r} says {key}={structure[key]} but "
                    f"rebuilding gave {summary[key]}; the structure record does not belong to this config."
                )
    # load_state_dict copies into the existing tensors, so tied parameters stay tied and dtypes follow the model.
    _load_state_strictly(model, _read_safetensors(directory), directory)
    generation_config = os.path.join(directory, "generation_config.json")
    if getattr(model, "generation_config", None) is not None and os.path.isfile(generation_config):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.config._name_or_path = str(path_or_repo_id)
    model.eval()
    return model

