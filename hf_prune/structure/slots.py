"""What importance scoring and gradual masking need of each unit holder: `UnitSlot`s over heads and FFN neurons.

A slot is one attention block (heads) or one layer (neurons): the module whose input columns carry the units (the
attention output projection, the MLP down projection) and which ORIGINAL unit each group of columns is. A
mixture-of-experts layer holds its neurons in many matrices, so its slot is made of parts, one per routed expert
present and one for the shared expert; neurons keep the layer's numbering (`expert * expert_size + neuron`, then the
shared expert's). Transformers 5 stores a layer's experts as 3D tensors and runs them without per-expert modules:
there a part's module is an `ExpertProjection` (one expert's down projection, as a module) and `expert_probes` runs
the experts through those modules while scoring, so forward hooks see each expert's inputs as on Transformers 4.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layout import (
    attention_sites,
    experts_are_fused,
    expert_size,
    find_layers,
    head_dim_of,
    kept_experts_of,
    kept_heads_of,
    kept_neurons_of,
    moe_kept_neurons,
    moe_neuron_total,
    num_experts_of,
    pruned_experts_of,
    pruned_heads_of,
    pruned_neurons_of,
)
from .paths import get_module
from .spec import MoeLayout


@dataclass(eq=False)  # identity: slots key masks and per-slot state
class UnitSlot:
    """One unit holder: where to hook and how its input channels map to original units.

    For heads a slot is one attention block (`attention_sites`), for neurons one layer. A mixture-of-experts layer's
    slot has `parts` (one slot per expert matrix, same `layer_idx` and `total`) and no module of its own.
    """

    layer_idx: int  # the key of prune_heads / prune_ffn_neurons
    module: Optional[nn.Module]  # the output projection (heads) or down projection (neurons); None when empty
    unit_width: int  # channels per unit: head_dim for heads, 1 for neurons
    kept: list[int]  # original indices of the units present, in channel order
    total: int  # units in the original block
    parts: list["UnitSlot"] = field(default_factory=list)
    # A fused experts tensor (experts, out, in) of which row `expert` is this slot's matrix (Transformers 5 MoE).
    parameter: Optional[nn.Parameter] = None
    expert: Optional[int] = None

    def pieces(self) -> list["UnitSlot"]:
        """The slots that hold matrices: the parts of a mixture-of-experts layer, else the slot itself."""
        return self.parts or [self]

    @property
    def leaf(self) -> torch.Tensor:
        """The trainable tensor this slot's matrix lives in (what the optimizer and autograd see)."""
        return self.parameter if self.parameter is not None else self.module.weight

    def matrix_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This slot's matrix within `tensor`, a tensor shaped like `leaf` (the weight or its gradient)."""
        return tensor[self.expert] if self.expert is not None else tensor

    def mask_of(self, columns: torch.Tensor, matrix_mask: torch.Tensor) -> torch.Tensor:
        """A boolean mask of `leaf`'s shape that is `matrix_mask` on this slot's matrix (for optimizer state)."""
        if self.expert is None:
            return matrix_mask
        full = torch.zeros(self.parameter.shape, dtype=torch.bool, device=columns.device)
        full[self.expert] = matrix_mask
        return full


class ExpertProjection(nn.Module):
    """One routed expert's down projection inside a fused experts module (Transformers 5), as a module.

    It owns no parameter: `weight` is a view of row `index` of the experts' 3D tensor, so reading and masking it
    reads and masks the model's own weight.
    """

    def __init__(self, experts: nn.Module, name: str, index: int) -> None:
        super().__init__()
        self.__dict__["experts"] = experts  # not a submodule: the experts module belongs to the model
        self.name = name
        self.index = index

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.name)[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def head_slots(model: nn.Module) -> list[UnitSlot]:
    slots = []
    for site in attention_sites(model):
        kept = kept_heads_of(site.spec, site.layer)
        total = len(kept) + len(pruned_heads_of(site.spec, site.layer))
        module = get_module(site.layer, site.spec.output) if kept else None
        slots.append(UnitSlot(site.index, module, head_dim_of(site.spec, site.layer), kept, total))
    return slots


def neuron_slots(model: nn.Module) -> list[UnitSlot]:
    """One slot per layer, in layer order; a mixture-of-experts layer's slot is made of parts."""
    _, view = find_layers(model)
    slots = []
    for i, layer in enumerate(view):
        moe = view.layout(i).moe
        if moe is not None:
            slots.append(moe_neuron_slot(moe, layer, i))
            continue
        mlp = view.layout(i).require_mlp()
        kept = kept_neurons_of(mlp, layer)
        total = len(kept) + len(pruned_neurons_of(mlp, layer))
        module = get_module(layer, mlp.output) if kept else None
        slots.append(UnitSlot(i, module, 1, kept, total))
    return slots


def moe_neuron_slot(moe: MoeLayout, layer: nn.Module, layer_idx: int) -> UnitSlot:
    """A mixture-of-experts layer's neurons: one part per routed expert present, then the shared expert's."""
    size, kept, total = expert_size(moe, layer), moe_kept_neurons(moe, layer), moe_neuron_total(moe, layer)
    experts = get_module(layer, moe.experts)
    fused = experts_are_fused(moe, layer)
    parts = []
    for position, expert in enumerate(kept_experts_of(moe, layer)):
        own = [n for n in kept if expert * size <= n < (expert + 1) * size]
        if fused:
            part = UnitSlot(layer_idx, ExpertProjection(experts, moe.fused_down, position), 1, own, total,
                            parameter=getattr(experts, moe.fused_down), expert=position)
        else:
            part = UnitSlot(layer_idx, get_module(experts[position], moe.expert_mlp.output), 1, own, total)
        parts.append(part)
    offset = (num_experts_of(moe, layer) + len(pruned_experts_of(moe, layer))) * size
    shared = [n for n in kept if n >= offset]
    if shared:
        parts.append(UnitSlot(layer_idx, get_module(layer, moe.shared.output), 1, shared, total))
    return UnitSlot(layer_idx, None, 1, kept, total, parts=[p for p in parts if p.kept])


@contextmanager
def expert_probes(slots: list[UnitSlot]) -> Iterator[None]:
    """While active, fused experts modules that hold a slot's `ExpertProjection` run expert by expert through it.

    The loop is Transformers 5's own eager experts forward (tokens routed to an expert, the gated activation, the
    down projection, weighted by the router and added back), with the down projection called as a module so that
    forward hooks see each expert's inputs. Restored on exit, also on errors.
    """
    probes: dict[nn.Module, dict[int, ExpertProjection]] = {}
    for slot in slots:
        if isinstance(slot.module, ExpertProjection):
            probes.setdefault(slot.module.experts, {})[slot.module.index] = slot.module
    for experts, own in probes.items():
        missing = [a for a in ("act_fn", "gate_up_proj") if not hasattr(experts, a)]
        if missing:
            raise ValueError(
                f"hf_prune: {type(experts).__name__} has no {missing}; importance scoring of neurons inside fused "
                "experts knows the gate_up_proj / down_proj / act_fn experts modules of Transformers 5."
            )
        experts.forward = types.MethodType(_probed_experts_forward(own), experts)
    try:
        yield
    finally:
        for experts in probes:
            del experts.forward  # the instance attribute: the class's forward is back


def _probed_experts_forward(probes: dict[int, ExpertProjection]):
    down = next(iter(probes.values())).name

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        gate_up = self.gate_up_proj
        for expert in range(gate_up.shape[0]):
            token_idx, top_k_pos = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(hidden_states[token_idx], gate_up[expert]).chunk(2, dim=-1)
            hidden = self.act_fn(gate) * up
            probe = probes.get(expert)
            hidden = probe(hidden) if probe is not None else F.linear(hidden, getattr(self, down)[expert])
            hidden = hidden * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, hidden.to(final.dtype))
        return final

    return forward
