"""Slicing the inputs or outputs of one Linear / Conv1D layer in place."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..linear import is_conv1d, matrix_view
from .standins import BiasOnly, ZeroWidth

def check_plain(module: nn.Module, name: str) -> None:
    if parametrize.is_parametrized(module) or hasattr(module, "weight_orig"):
        raise ValueError(
            f"hf_prune: module {name!r} still carries a pruning mask (parametrization or torch.nn.utils.prune hook); "
            "call hf_prune.make_permanent(model) before removing structure."
        )


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set `module.name` to a new Parameter holding `value` (a contiguous copy), keeping `requires_grad`."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))


def keep_outputs(module: nn.Module, index: torch.Tensor, name: str) -> None:
    """Keep only output features `index` of a Linear or Conv1D, in place (dtype, device and hooks unchanged)."""
    check_plain(module, name)
    index = index.to(module.weight.device)
    if is_conv1d(module):
        replace_parameter(module, "weight", module.weight.index_select(1, index))
        module.nf = len(index)
    else:
        replace_parameter(module, "weight", module.weight.index_select(0, index))
        module.out_features = len(index)
    if module.bias is not None:
        replace_parameter(module, "bias", module.bias.index_select(0, index))


def keep_inputs(module: nn.Module, index: torch.Tensor, name: str) -> None:
    """Keep only input features `index` of a Linear or Conv1D, in place; the bias is untouched."""
    check_plain(module, name)
    index = index.to(module.weight.device)
    if is_conv1d(module):
        replace_parameter(module, "weight", module.weight.index_select(0, index))
        module.nx = len(index)
    else:
        replace_parameter(module, "weight", module.weight.index_select(1, index))
        module.in_features = len(index)


def in_width_of(module: nn.Module) -> int:
    if isinstance(module, BiasOnly):
        return 0
    if isinstance(module, ZeroWidth):
        return module.in_features
    return matrix_view(module).shape[1]


def out_width_of(module: nn.Module) -> int:
    if isinstance(module, ZeroWidth):
        return 0
    if isinstance(module, BiasOnly):
        return module.out_features
    return matrix_view(module).shape[0]


def channel_index(units: Sequence[int], width: int, offset: int = 0) -> torch.Tensor:
    """Channel indices of `units` (heads, groups) of `width` channels each."""
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offset + u * width, offset + (u + 1) * width) for u in units])
