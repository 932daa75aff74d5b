"""The transformer blocks of a model, and the inputs its first block receives.

One-shot pruning walks the blocks in order, with only one block's activations in memory. It needs the list of
blocks (`model.model.layers` in Llama, Mistral and Qwen; `transformer.h` in GPT-2; `model.decoder.layers` in OPT) and
what the model passes the first block for each calibration batch: the hidden states and every keyword argument
(attention mask, position ids, rotary embeddings), whatever the architecture computes them as.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

BlockInputs = tuple[tuple, dict[str, Any]]  # (positional args, keyword args) of one block call


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of `model`'s transformer blocks (as many as config.num_hidden_layers)."""
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0 and (depth is None or len(module) == depth)]
    if not candidates:
        raise ValueError(
            f"hf_prune.oneshot: no list of transformer blocks found in {type(model).__name__} (looked for an "
            f"nn.ModuleList of config.num_hidden_layers={depth} modules). One-shot pruning supports decoder models "
            "whose blocks sit in one ModuleList (Llama, Mistral, Qwen2, GPT-2, OPT, ...)."
        )
    return candidates[0]


class _Captured(Exception):
    """Raised by the first block's hook: the rest of the forward pass is not needed."""


def move(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside (tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


def as_model_inputs(batch: Any) -> dict[str, Any]:
    """A calibration batch as keyword arguments of the model: a dict (labels dropped: no loss is needed), or a
    tensor of input ids."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: v for k, v in dict(batch).items() if k != "labels"}
    raise TypeError(f"hf_prune.oneshot: calibration batches must be dicts of tensors (input_ids, attention_mask) or "
                    f"tensors of input ids, got {type(batch).__name__}.")


@torch.no_grad()
def first_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable[Any],
                       device: torch.device, max_batches: Optional[int] = None) -> list[BlockInputs]:
    """Run each batch through the model up to its first block and keep what that block was called with (on
    `device`)."""
    captured: list[BlockInputs] = []

    def hook(module, args, kwargs):
        captured.append((move(args, device), move(kwargs, device)))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            try:
                model(**move(as_model_inputs(batch), device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("hf_prune.oneshot: the calibration data yielded no batch; give at least one.")
    return captured


def with_hidden_states(inputs: BlockInputs, hidden_states: torch.Tensor) -> BlockInputs:
    """The same block call with other hidden states (the previous block's output)."""
    args, kwargs = inputs
    if args:
        return (hidden_states,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden_states}


def hidden_states_of(output: Any) -> torch.Tensor:
    """A block's output hidden states: blocks return a tensor (Transformers 5, recent Llama) or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output
