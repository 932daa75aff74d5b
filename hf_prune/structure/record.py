"""The structure record kept in the model's config, so that every save path carries the shapes.

`config.hf_prune_structure` holds the heads and FFN neurons removed per layer (ORIGINAL numbering) and the resulting
sizes. A config attribute travels with `save_pretrained`, `push_to_hub` and Trainer checkpoints, so `load_pruned`
can rebuild a model saved in any of those ways, with or without `hf_prune_structure.json` beside it.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from transformers.utils import logging

from .summary import int_keys, structure_summary

logger = logging.get_logger(__name__)

CONFIG_ATTR = "hf_prune_structure"
# Version of the structure record and of `hf_prune_structure.json`; a newer one loads with a warning, its unknown
# keys ignored.
STRUCTURE_FORMAT_VERSION = 1
RECORD_KEYS = ("format_version", "pruned_heads", "pruned_neurons", "heads_per_layer", "intermediate_sizes")


def record_structure(model: nn.Module) -> Optional[dict]:
    """Write the model's current structure into `model.config.hf_prune_structure` (removed when nothing is pruned).

    Called by `prune_heads` and `prune_ffn_neurons` after every change. Returns the record, or None.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    summary = structure_summary(model)
    if not summary["pruned_heads"] and not summary["pruned_neurons"]:
        if hasattr(config, CONFIG_ATTR):
            delattr(config, CONFIG_ATTR)
        return None
    record = {
        "format_version": STRUCTURE_FORMAT_VERSION,
        # JSON object keys are strings: written as such so that the in-memory and the reloaded config agree.
        "pruned_heads": {str(k): v for k, v in summary["pruned_heads"].items()},
        "pruned_neurons": {str(k): v for k, v in summary["pruned_neurons"].items()},
        "heads_per_layer": summary["heads_per_layer"],
        "intermediate_sizes": summary["intermediate_sizes"],
    }
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
    unknown = sorted(set(record) - set(RECORD_KEYS) - {"hf_prune_version", "transformers_version", "architecture",
                                                         "num_layers", "num_attention_heads", "key_value_heads_per_layer",
                                                         "head_group_size", "intermediate_size", "parameters",
                                                         "loads_with_from_pretrained"})
    if isinstance(version, int) and version > STRUCTURE_FORMAT_VERSION:
        logger.warning(
            "hf_prune: the structure record in %s was written by a newer hf_prune (format_version %s, this one reads "
            "%s); ignoring what it does not know: %s.", source, version, STRUCTURE_FORMAT_VERSION, unknown,
        )
    try:
        return {
            **{k: record[k] for k in ("heads_per_layer", "intermediate_sizes") if k in record},
            "pruned_heads": int_keys(record.get("pruned_heads") or {}),
            "pruned_neurons": int_keys(record.get("pruned_neurons") or {}),
        }
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"hf_prune: the structure record in {source} is malformed ({err}); it must map layer indices to lists of "
            "original head / neuron indices."
        ) from None
