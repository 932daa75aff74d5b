"""Per-head tensors computed outside an attention block for every ORIGINAL head, kept consistent when blocks lose
different heads.

MPNet computes one relative position bias `(batch, heads, queries, keys)` in its encoder and hands it to every
layer: `select_head_inputs` installs a forward pre-hook that gives each block the heads it kept.

T5 goes further: it computes its relative position bias in the first layer of each stack (`share_position_bias`).

T5 computes its relative position bias `(1, heads, queries, keys)` in the first layer of each stack, from a table
with one column per head, and passes the same tensor to every later layer (cross-attention gets a zero bias of the
same shape the same way). A layer that lost heads needs the bias of the heads it kept, while the layers after it
still need every head's. So the bias is kept for all ORIGINAL heads as it travels, and each block selects its own:

- Transformers 4.x does the selection itself from the block's `pruned_heads`; only the zero bias a cross-attention
  creates would be made for the heads present, so a forward pre-hook hands it a zero bias for every original head.
- Transformers 5.x has no selection: a pre-hook selects the kept heads of the incoming bias (or of the one the block
  computes, through its `compute_bias`) and a forward hook hands the bias for every head on to the next layer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .standins import TRANSFORMERS_MAJOR

_HOOKS = "hf_prune_position_bias_hooks"
_SELECT_HOOK = "hf_prune_head_inputs_hook"
ARGUMENT = "position_bias"


def _argument(core: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    names = list(inspect.signature(core.forward).parameters)
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


def _set_argument(core: nn.Module, name: str, args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
    names = list(inspect.signature(core.forward).parameters)
    index = names.index(name) if name in names else len(args)
    if name not in kwargs and index < len(args):
        args = args[:index] + (value,) + args[index + 1:]
    else:
        kwargs[name] = value
    return args, kwargs


def _zero_bias(core: nn.Module, args: tuple, kwargs: dict, heads: int) -> torch.Tensor:
    hidden = args[0] if args else kwargs["hidden_states"]
    states = _argument(core, "key_value_states", args, kwargs)
    keys = states.shape[1] if states is not None else hidden.shape[1]
    return hidden.new_zeros((1, heads, hidden.shape[1], keys))


def select_head_inputs(core: nn.Module, names: tuple[str, ...], kept: list[int]) -> None:
    """(Re)install a forward pre-hook giving `core` the `kept` heads (ORIGINAL indices, axis 1) of the per-head
    arguments `names`; with no names, remove it."""
    handle = getattr(core, _SELECT_HOOK, None)
    if handle is not None:
        handle.remove()
        delattr(core, _SELECT_HOOK)
    if not names:
        return
    index = torch.tensor(kept, dtype=torch.long)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        for name in names:
            tensor = _argument(module, name, args, kwargs)
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[1] > len(kept):
                args, kwargs = _set_argument(module, name, args, kwargs, tensor.index_select(1, index.to(tensor.device)))
        return args, kwargs

    setattr(core, _SELECT_HOOK, core.register_forward_pre_hook(hook, with_kwargs=True))


def share_position_bias(core: nn.Module, kept: list[int], total: int) -> None:
    """(Re)install the hooks that give `core` the bias of its `kept` heads (ORIGINAL indices, of `total`)."""
    for handle in getattr(core, _HOOKS, ()):
        handle.remove()
    if "compute_bias" in vars(core):
        del core.compute_bias
    index = torch.tensor(kept, dtype=torch.long)
    state: dict[str, Any] = {}

    if TRANSFORMERS_MAJOR < 5:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            if _argument(module, ARGUMENT, args, kwargs) is None and not module.has_relative_attention_bias:
                args, kwargs = _set_argument(module, ARGUMENT, args, kwargs, _zero_bias(module, args, kwargs, total))
            return args, kwargs

        setattr(core, _HOOKS, [core.register_forward_pre_hook(pre, with_kwargs=True)])
        return

    compute_bias = core.compute_bias

    def computed(*args: Any, **kwargs: Any) -> torch.Tensor:
        state["full"] = compute_bias(*args, **kwargs)
        return state["full"].index_select(1, index.to(state["full"].device))

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        bias = _argument(module, ARGUMENT, args, kwargs)
        if bias is None and not module.has_relative_attention_bias:
            bias = _zero_bias(module, args, kwargs, total)
        state["full"] = bias
        if bias is not None:
            args, kwargs = _set_argument(module, ARGUMENT, args, kwargs, bias.index_select(1, index.to(bias.device)))
        return args, kwargs

    def post(module: nn.Module, args: tuple, output: Any) -> Any:
        full = state.pop("full", None)
        if full is None or not isinstance(output, tuple) or len(output) < 2:
            return output
        return (output[0], full) + tuple(output[2:])

    core.compute_bias = computed
    setattr(core, _HOOKS, [core.register_forward_pre_hook(pre, with_kwargs=True), core.register_forward_hook(post)])
