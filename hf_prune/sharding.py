"""Which distributed engines hf_prune can prune under, checked before training starts.

hf_prune ranks whole weight matrices and zeroes them in place on every process, which is right when every process
holds every parameter in full (one process, DDP, DeepSpeed ZeRO-1/2). Engines that shard parameters across processes
(FSDP1 flat parameters, FSDP2 `fully_shard` DTensors, DeepSpeed ZeRO-3 partitions) would have each process rank its own
shard and mask a tensor it holds only a piece of, so they are refused with a message saying what works instead.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

SUPPORTED = "one process, DDP (torchrun / accelerate launch without FSDP) or DeepSpeed ZeRO-1/2"


def sharding_engine(model: Optional[nn.Module] = None, args: Any = None) -> Optional[str]:
    """The parameter-sharding engine `model` or `args` (TrainingArguments) use, or None when parameters are whole."""
    if args is not None:
        if getattr(args, "fsdp", None):
            return "FSDP (TrainingArguments.fsdp)"
        if getattr(args, "deepspeed", None):
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                return "DeepSpeed ZeRO-3"
    if model is not None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch build without distributed support
            DTensor = ()
        for param in model.parameters():
            if DTensor and isinstance(param, DTensor):
                return "FSDP2 / tensor parallelism (parameters are DTensors)"
            if getattr(param, "_is_flat_param", False):
                return "FSDP1 (flat parameters)"
            if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
                return "DeepSpeed ZeRO-3 (partitioned parameters)"
    return None


def check_unsharded(model: Optional[nn.Module] = None, args: Any = None) -> None:
    """Refuse, with what works instead, to prune parameters that are sharded across processes."""
    engine = sharding_engine(model, args)
    if engine is not None:
        raise ValueError(
            f"hf_prune cannot prune under {engine} yet: each process holds only a shard of every weight, so ranking "
            f"would see a piece and masks would be applied to part of a tensor. Prune with {SUPPORTED}; masks are "
            "identical on every rank there. For a model too large for one device, prune one-shot on a machine that "
            "holds it, or train with DDP and gradient accumulation."
        )
