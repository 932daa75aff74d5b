"""The layers pruning applies to: `nn.Linear` and Transformers' `Conv1D` (GPT-2 family), seen the same way.

`Conv1D` stores its weight as (in_features, out_features), the transpose of `nn.Linear`. Every pattern, score and
structural slice in hf_prune works on the (out_features, in_features) view that `matrix_view` returns, so the rest of
the code never asks which of the two it holds.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Transformers' `Conv1D` (GPT-2, GPT-J's ancestors): matched by name, so hf_prune needs no import of it."""
    return type(module).__name__ == "Conv1D"


def is_prunable_module(module: nn.Module) -> bool:
    """nn.Linear and Transformers' Conv1D are the layers pruning applies to."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def matrix_view(module: nn.Module, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`tensor` (default the weight) as (out_features, in_features), a view that shares storage."""
    tensor = module.weight if tensor is None else tensor
    return tensor.t() if is_conv1d(module) else tensor


def stored_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of `matrix_view`: an (out, in) tensor in the layout the module stores its weight in."""
    return matrix.t().contiguous() if is_conv1d(module) else matrix
