"""The structure record kept in the model's config, so that every save path carries the shapes.

`config.hf_prune_structure` holds the heads and FFN neurons removed per layer, the layers removed and the hidden
channels removed, all in the ORIGINAL numbering (layers too: head and neuron lists are keyed by the layer's original
index), and the resulting sizes. A config attribute travels with `save_pretrained`, `push_to_hub` and Trainer
checkpoints, so `load_pruned` can rebuild a model saved in any of those ways, with or without
`hf_prune_structure.json` beside it.

Versions. Format 1 records heads and neurons; format 2 adds layers (`pruned_layers`, `original_num_layers`) and
hidden channels (`pruned_hidden`, `original_hidden_size`, `norm_elements`); format 3 adds the experts of
mixture-of-experts layers (`pruned_experts`, `experts_per_layer`). A record is written in the lowest format
that describes it, so a model with only heads and neurons removed stays loadable by hf_prune versions that read
format 1; both formats load here (in format 1 no layer was removed, so positions and original indices agree).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import nn
from transformers.utils import logging

from .layout import original_layer_indices, original_site_indices
from .summary import int_keys, structure_summary

logger = logging.get_logger(__name__)

CONFIG_ATTR = "hf_prune_structure"
# The newest version of the structure record and of `hf_prune_structure.json` this hf_prune reads (and writes, when
# layers or hidden channels were removed); a newer one loads with a warning, its unknown keys ignored.
STRUCTURE_FORMAT_VERSION = 3
RECORD_KEYS = ("format_version", "pruned_heads", "pruned_neurons", "heads_per_layer", "intermediate_sizes")
# Keys of `hf_prune_structure.json` (the structure summary) that loading does not need.
SUMMARY_ONLY_KEYS = (
    "hf_prune_version", "transformers_version", "architecture", "num_attention_heads", "key_value_heads_per_layer",
    "head_group_size", "intermediate_size", "parameters", "loads_with_from_pretrained", "head_dim",
)
# Format 3: experts of mixture-of-experts layers, and the layer count of each stack of an encoder-decoder model.
FORMAT_3_KEYS = ("pruned_experts", "experts_per_layer", "original_stack_layers")
# Format 2: layers and hidden channels.
DEPTH_WIDTH_KEYS = (
    "pruned_layers", "original_num_layers", "num_layers", "pruned_hidden", "original_hidden_size", "hidden_size",
    "norm_elements",
)


def check_config_change(config: Any, changes: dict[str, Any], caller: str) -> None:
    """Raise a ValueError, before anything is changed, if Transformers would refuse `config` with `changes` applied.

    Transformers 5 validates configs when they are saved and loaded (e.g. LlamaConfig wants `hidden_size` to be a
    multiple of `num_attention_heads`, and `layer_types` one entry per layer): a model pruned into a config it refuses
    could be neither saved nor reloaded.
    """
    if config is None or not hasattr(config, "validate"):
        return
    trial = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(trial, key, value)
    try:
        trial.validate()
    except Exception as err:  # huggingface_hub's validation error wraps the config's own ValueError
        cause = err.__cause__ or err
        raise ValueError(
            f"hf_prune.{caller}: Transformers would refuse to save or load the pruned config "
            f"({', '.join(f'{k}={v!r}' for k, v in changes.items())}): {cause}"
        ) from None


def structure_record(model: nn.Module) -> Optional[dict]:
    """The structure record of `model` (layer keys and indices in the ORIGINAL numbering), None when nothing is pruned."""
    summary = structure_summary(model)
    depth_or_width = bool(summary["pruned_layers"] or summary["pruned_hidden"])
    experts = bool(summary["pruned_experts"]) or bool(summary["pruned_layers"] and summary["original_stack_layers"])
    if not summary["pruned_heads"] and not summary["pruned_neurons"] and not depth_or_width and not experts:
        return None
    original = original_layer_indices(model)
    heads_key = original_site_indices(model)  # the layers' own indices where each layer has one attention block
    record = {
        "format_version": 3 if experts else 2 if depth_or_width else 1,
        # JSON object keys are strings: written as such so that the in-memory and the reloaded config agree.
        "pruned_heads": {str(heads_key[k]): v for k, v in summary["pruned_heads"].items()},
        "pruned_neurons": {str(original[k]): v for k, v in summary["pruned_neurons"].items()},
        "heads_per_layer": summary["heads_per_layer"],
        "intermediate_sizes": summary["intermediate_sizes"],
    }
    if depth_or_width or experts:
        record.update({key: summary[key] for key in DEPTH_WIDTH_KEYS})
        if summary.get("original_stack_layers"):
            record["original_stack_layers"] = summary["original_stack_layers"]
    if experts:
        record["pruned_experts"] = {str(original[k]): v for k, v in summary["pruned_experts"].items()}
        record["experts_per_layer"] = summary["experts_per_layer"]
    return record


def record_structure(model: nn.Module) -> Optional[dict]:
    """Write the model's current structure into `model.config.hf_prune_structure` (removed when nothing is pruned).

    Called by `prune_heads`, `prune_ffn_neurons`, `prune_layers` and `prune_hidden` after every change. Returns the
    record, or None.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    record = structure_record(model)
    if record is None:
        if hasattr(config, CONFIG_ATTR):
            delattr(config, CONFIG_ATTR)
        return None
    setattr(config, CONFIG_ATTR, record)
    return record


def read_record(record: Any, source: str) -> dict:
    """A structure record (from the config or the JSON file) checked and normalised: integer layer keys.

    A record written by a newer hf_prune loads with a warning and its unknown keys ignored; a record that is not a
    mapping raises a ValueError naming `source`.
    """
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise ValueError(f"hf_prune: the structure record in {source} must be a JSON object, got {type(record).__name__}.")
    version = record.get("format_version", 1)
    unknown = sorted(set(record) - set(RECORD_KEYS) - set(DEPTH_WIDTH_KEYS) - set(FORMAT_3_KEYS) - set(SUMMARY_ONLY_KEYS))
    if isinstance(version, int) and version > STRUCTURE_FORMAT_VERSION:
        logger.warning(
            "hf_prune: the structure record in %s was written by a newer hf_prune (format_version %s, this one reads "
            "%s); ignoring what it does not know: %s.", source, version, STRUCTURE_FORMAT_VERSION, unknown,
        )
    try:
        result = {
            **{k: record[k] for k in ("heads_per_layer", "intermediate_sizes", "experts_per_layer") if k in record},
            "pruned_heads": int_keys(record.get("pruned_heads") or {}),
            "pruned_neurons": int_keys(record.get("pruned_neurons") or {}),
            "pruned_experts": int_keys(record.get("pruned_experts") or {}),
            "pruned_layers": sorted({int(i) for i in record.get("pruned_layers") or ()}),
            "pruned_hidden": sorted({int(i) for i in record.get("pruned_hidden") or ()}),
        }
        if isinstance(record.get("original_stack_layers"), dict):
            result["original_stack_layers"] = {str(k): int(v) for k, v in record["original_stack_layers"].items()}
        for key in ("original_num_layers", "num_layers", "original_hidden_size", "hidden_size", "norm_elements"):
            if record.get(key) is not None:
                result[key] = int(record[key])
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"hf_prune: the structure record in {source} is malformed ({err}); it must map layer indices to lists of "
            "original head / neuron indices, and list original layer and hidden-channel indices."
        ) from None
    for removed, total in (("pruned_layers", "original_num_layers"), ("pruned_hidden", "original_hidden_size")):
        if result[removed] and total not in result:
            raise ValueError(f"hf_prune: the structure record in {source} lists {removed} but not {total}.")
    return result
