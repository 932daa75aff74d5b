"""Which distributed engines hf_prune can prune under, and the few tensor helpers sharded parameters need.

hf_prune ranks whole weight matrices. With every parameter whole on every process (one process, DDP, DeepSpeed
ZeRO-1/2) that needs nothing. Under FSDP2 (`fully_shard`: parameters are DTensors sharded by rows or columns) the
scores are gathered to rank the whole matrix, identically on every process, and each process applies its shard of
the mask (`full`, `shard_like`). FSDP1's flat parameters and DeepSpeed ZeRO-3's partitions hide the matrices
altogether, so they are refused with a message saying what works instead.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

SUPPORTED = "one process, DDP (torchrun / accelerate launch), FSDP2 (fully_shard, fsdp_version 2) or DeepSpeed ZeRO-1/2"


def sharding_engine(model: Optional[nn.Module] = None, args: Any = None) -> Optional[str]:
    """The parameter-sharding engine `model` or `args` (TrainingArguments) use, or None when parameters are whole."""
    if args is not None:
        fsdp_config = getattr(args, "fsdp_config", None) or {}
        if getattr(args, "fsdp", None) and int(fsdp_config.get("version", 1)) != 2:
            return "FSDP1 (TrainingArguments.fsdp without fsdp_version 2)"
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
            if DTensor and isinstance(param, DTensor) and not _row_or_column_sharded(param):
                return "tensor parallelism or an FSDP2 placement other than Shard(0) / Shard(1)"
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
            f"hf_prune cannot prune under {engine}: its parameters are not weight matrices hf_prune can rank and "
            f"mask. Prune with {SUPPORTED}; masks are identical on every rank there."
        )


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def _row_or_column_sharded(param: Any) -> bool:
    from torch.distributed.tensor import Replicate, Shard

    return all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim in (0, 1)) for p in param.placements)


def is_sharded(tensor: Any) -> bool:
    """Whether `tensor` is a DTensor (a parameter of FSDP2's `fully_shard`, or a gradient or state made from one)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full(tensor: Any) -> Any:
    """The whole tensor on every process: gathered from the shards of a DTensor (a collective: every rank must
    call it at the same point), `tensor` itself otherwise."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(whole: Any, reference: Any) -> Any:
    """`whole` (the same on every process) cut the way `reference` is sharded, without communication; `whole` itself
    when `reference` is an ordinary tensor."""
    if not is_sharded(reference):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(reference.device_mesh.device_type), reference.device_mesh, reference.placements,
                             src_data_rank=None)
