"""What both `hf-prune optimize` roads (classifiers, causal LMs) share: importance scored once on the dense model,
and candidate shapes cut from it."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from ..structure import prune_hidden, prune_layers, structure_summary
from ..units import (
    compute_channel_importance,
    compute_head_importance,
    compute_layer_importance,
    compute_neuron_importance,
    prune_by_importance,
    select_channels_to_prune,
    select_layers_to_prune,
)

# The hidden size --hidden_fraction leaves is rounded to a multiple of this: matrix kernels run fastest on such widths.
HIDDEN_MULTIPLE = 8


@dataclass
class Importance:
    """What the score phase found, once: head and neuron importance, and the layers and channels that go."""

    heads: torch.Tensor
    neurons: dict
    layers_gone: list[int]
    channels_gone: list[int]
    layer_scores: Optional[torch.Tensor] = None
    channel_scores: Optional[torch.Tensor] = None

    def with_axes(self, model: torch.nn.Module, layers: int = 0, hidden: float = 0.0) -> "Importance":
        """The same scores with the `layers` least influential layers and `hidden` of the channels (lowest first)
        going instead: another candidate shape without scoring again."""
        if (layers and self.layer_scores is None) or (hidden and self.channel_scores is None):
            raise ValueError("with_axes: score_structures did not score layers / hidden channels (every_axis=False).")
        return dataclasses.replace(
            self,
            layers_gone=select_layers_to_prune(self.layer_scores, layers, model=model) if layers else [],
            channels_gone=select_channels_to_prune(self.channel_scores, hidden, model=model,
                                                   multiple_of=HIDDEN_MULTIPLE) if hidden else [],
        )


def score_structures(dense: torch.nn.Module, calibration: Iterable[Any], opt: Any,
                     every_axis: bool = False) -> Importance:
    """Importance of heads and neurons by `opt.importance`, and the `opt.layers_to_remove` layers (by
    `opt.layer_importance`, block influence by default) and `opt.hidden_fraction` of the hidden channels every
    candidate loses, on `opt.calibration_batches` batches. `every_axis` scores layers and channels even when the
    options remove none, for a search over the axes (`Importance.with_axes`)."""
    batches = opt.calibration_batches
    heads = compute_head_importance(dense, calibration, method=opt.importance, max_batches=batches)
    neurons = compute_neuron_importance(dense, calibration, method=opt.importance, max_batches=batches)
    if opt.layers_to_remove:
        num_layers = structure_summary(dense)["num_layers"]
        if opt.layers_to_remove >= num_layers:
            raise ValueError(f"--layers_to_remove {opt.layers_to_remove} is invalid: {opt.model_name_or_path!r} "
                             f"has {num_layers} layers and at least one must stay.")
    layer_scores = channel_scores = None
    if opt.layers_to_remove or every_axis:
        layer_scores = compute_layer_importance(dense, calibration, method=opt.layer_importance,
                                                max_batches=batches)
    if opt.hidden_fraction or every_axis:
        channel_scores = compute_channel_importance(dense, calibration, max_batches=batches)
    found = Importance(heads, neurons, [], [], layer_scores, channel_scores)
    return found.with_axes(dense, opt.layers_to_remove, opt.hidden_fraction)


def cut(dense: torch.nn.Module, found: Importance, fraction: float, remove_units: Any = None) -> torch.nn.Module:
    """A copy of `dense` with `fraction` of heads and neurons removed (by `remove_units(model, heads, neurons,
    fraction)`, default lowest importance across layers), then the layers and hidden channels `found` names."""
    model = copy.deepcopy(dense)
    # Heads and neurons first, while the layers still have their original numbering.
    if remove_units is None:
        prune_by_importance(model, found.heads, found.neurons, fraction, fraction)
    else:
        remove_units(model, found.heads, found.neurons, fraction)
    if found.layers_gone:
        prune_layers(model, found.layers_gone)
    if found.channels_gone:
        prune_hidden(model, found.channels_gone)
    return model
