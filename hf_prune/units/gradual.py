"""Head and FFN-neuron pruning during fine-tuning: score, mask gradually, remove physically at the end.

While training runs, a removed head or neuron is only masked: the columns of the attention output projection (or
MLP down projection) that carry it are held at zero, which removes its contribution exactly and keeps every
parameter's shape, so the optimizer and checkpoints stay valid. When training ends the masked units are removed for
real with `prune_heads` / `prune_ffn_neurons`, which gives the same outputs with smaller matrices.

Importance is the `taylor` criterion, read off the projection weights and the gradients every training step already
has, with no extra forward or backward pass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import PruningConfig
from ..linear import is_conv1d
from ..optim import clear_optimizer_state
from ..structure import UnitSlot, head_group_size, head_slots, neuron_slots, prune_ffn_neurons, prune_heads
from ..structure.layout import min_heads_per_block
from .base import normalize_per_layer
from .selection import select_heads_to_prune, select_neurons_to_prune
from .taylor import taylor_unit_scores


class GradualUnitPruner:
    """Gradual removal of `config.head_sparsity` of the attention heads and `config.neuron_sparsity` of the FFN
    neurons of `model` (fractions of all heads / neurons, ranked across layers)."""

    def __init__(self, model: nn.Module, config: PruningConfig) -> None:
        self.model = model
        self.config = config
        self.head_slots = head_slots(model) if config.head_sparsity > 0 else []
        self.neuron_slots = neuron_slots(model) if config.neuron_sparsity > 0 else []
        self.group_size = head_group_size(model) if self.head_slots else 1
        self.min_heads = min_heads_per_block(model) if self.head_slots else 0
        width = max((slot.total for slot in self.head_slots), default=0)
        self.head_scores = torch.zeros(len(self.head_slots), width)
        self.neuron_scores = {slot.layer_idx: torch.zeros(slot.total) for slot in self.neuron_slots}
        # The matrices: one per slot, several per mixture-of-experts layer (its experts).
        self.pieces = [(kind, piece) for kind, slots in (("heads", self.head_slots), ("neurons", self.neuron_slots))
                       for slot in slots for piece in slot.pieces() if piece.module is not None]
        self.pruned_heads: dict[int, list[int]] = {}
        self.pruned_neurons: dict[int, list[int]] = {}
        self.column_masks: dict[UnitSlot, torch.Tensor] = {}
        self.removed = False

    # ------------------------------------------------------------------------------------------------ scores
    @torch.no_grad()
    def accumulate(self) -> None:
        """Add |gate gradient| of every live unit, read off the projection weights and their gradients."""
        for kind, slot in self.pieces:
            grad = slot.leaf.grad
            if grad is None:
                continue
            weight = slot.matrix_of(slot.leaf.detach())
            per_unit = taylor_unit_scores(slot, weight, slot.matrix_of(grad)).cpu()
            row = self.head_scores[slot.layer_idx] if kind == "heads" else self.neuron_scores[slot.layer_idx]
            row[slot.kept] += per_unit

    # ------------------------------------------------------------------------------------------------- masks
    def prune_to(self, head_fraction: float, neuron_fraction: float) -> None:
        """Mask the lowest-scoring units so that these fractions of all heads / neurons are gone (monotone)."""
        if self.head_slots and head_fraction > 0:
            self.pruned_heads = select_heads_to_prune(
                normalize_per_layer(self.head_scores), head_fraction, already_pruned=self.pruned_heads,
                group_size=self.group_size, min_heads_per_layer=self.min_heads,
            )
        if self.neuron_slots and neuron_fraction > 0:
            scores = {layer: normalize_per_layer(row) for layer, row in self.neuron_scores.items()}
            self.pruned_neurons = select_neurons_to_prune(scores, neuron_fraction, model=self.model,
                                                          already_pruned=self.pruned_neurons)
        self._build_column_masks()
        self.apply_masks()

    def _build_column_masks(self) -> None:
        self.column_masks = {}
        for kind, slot in self.pieces:
            gone = set((self.pruned_heads if kind == "heads" else self.pruned_neurons).get(slot.layer_idx, ()))
            if not gone:
                continue
            units = torch.tensor([unit in gone for unit in slot.kept], dtype=torch.bool)
            self.column_masks[slot] = units.repeat_interleave(slot.unit_width).to(slot.leaf.device)

    def _weight_mask(self, slot: UnitSlot, columns: torch.Tensor) -> torch.Tensor:
        # A broadcastable view: columns of the (out, in) matrix are rows of Conv1D's stored (in, out) weight.
        return columns.view(-1, 1) if is_conv1d(slot.module) else columns.view(1, -1)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for slot, columns in self.column_masks.items():
            if slot.leaf.grad is not None:
                slot.matrix_of(slot.leaf.grad).masked_fill_(self._weight_mask(slot, columns), 0.0)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for slot, columns in self.column_masks.items():
            slot.matrix_of(slot.leaf).masked_fill_(self._weight_mask(slot, columns), 0.0)

    @torch.no_grad()
    def clear_optimizer_state(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        for slot, columns in self.column_masks.items():
            matrix = slot.matrix_of(slot.leaf)
            mask = self._weight_mask(slot, columns).expand(matrix.shape)
            clear_optimizer_state(optimizer, slot.leaf, slot.mask_of(columns, mask))

    # ----------------------------------------------------------------------------------------------- removal
    def remove(self) -> dict[str, dict[int, list[int]]]:
        """Physically remove every masked head and neuron; outputs stay the same. Returns what was removed."""
        if not self.removed:
            if self.pruned_heads:
                prune_heads(self.model, self.pruned_heads)
            if self.pruned_neurons:
                prune_ffn_neurons(self.model, self.pruned_neurons)
            self.column_masks = {}
            self.removed = True
        return {"heads": self.pruned_heads, "neurons": self.pruned_neurons}

    def log_metrics(self) -> dict[str, float]:
        metrics = {}
        if self.head_slots:
            total = sum(slot.total for slot in self.head_slots)
            metrics["heads_pruned"] = sum(len(v) for v in self.pruned_heads.values()) / total
        if self.neuron_slots:
            total = sum(slot.total for slot in self.neuron_slots)
            metrics["neurons_pruned"] = sum(len(v) for v in self.pruned_neurons.values()) / total
        return metrics

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "head_scores": self.head_scores.clone(),
            "neuron_scores": {k: v.clone() for k, v in self.neuron_scores.items()},
            "pruned_heads": self.pruned_heads,
            "pruned_neurons": self.pruned_neurons,
        }

    def load_state_dict(self, state: dict) -> None:
        self.head_scores.copy_(state["head_scores"])
        for layer, row in state["neuron_scores"].items():
            self.neuron_scores[int(layer)].copy_(row)
        self.pruned_heads = {int(k): list(v) for k, v in state["pruned_heads"].items()}
        self.pruned_neurons = {int(k): list(v) for k, v in state["pruned_neurons"].items()}
        self._build_column_masks()
        self.apply_masks()

