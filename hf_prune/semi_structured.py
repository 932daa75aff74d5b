"""2:4 weights as GPU semi-structured sparse tensors (PyTorch's `torch.sparse.to_sparse_semi_structured`).

A Linear weight with exactly two zeros in every four consecutive inputs can be stored compressed (half the values
plus 2-bit indices) and multiplied by NVIDIA's sparse tensor cores (cuSPARSELt or CUTLASS kernels) on GPUs of compute
capability 8.0 and newer (Ampere, Hopper, ...). Measured speedups are often small or negative at small batch; see
`benchmarks/semi_structured.py` for what was measured, and treat 2:4 as an accuracy/storage format where it does not
pay off.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import nn

from .config import DEFAULT_EXCLUDE, DEFAULT_TARGETS
from .linear import is_conv1d
from .masks import find_target_modules

Backend = Literal["auto", "cusparselt", "cutlass"]
MIN_CAPABILITY = (8, 0)


def semi_structured_unavailable(device: Optional[torch.device] = None) -> Optional[str]:
    """Why 2:4 kernels cannot run here, or None when they can (a CUDA device of capability 8.0+)."""
    if not torch.cuda.is_available():
        return "no CUDA device is available (this PyTorch build or machine has none)"
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return f"the weights are on {device.type!r}, not on a CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}"
    return None


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row (nn.Linear layout) has at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(weight.shape[0], -1, 4) == 0).sum(dim=-1) >= 2).all())


@torch.no_grad()
def to_semi_structured(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    backend: Backend = "auto",
) -> dict:
    """Replace the weights of the targeted 2:4-sparse `nn.Linear` layers with semi-structured sparse tensors, in
    place, for inference on GPU (the model must already be on the GPU, in float16 or bfloat16).

    Args:
        targets / exclude: module-name regexes (default: the Linear layers inside the transformer blocks).
        backend: "cusparselt", "cutlass", or "auto" (PyTorch's choice: cuSPARSELt where it is available).

    Returns {"converted": [names], "skipped": {name: reason}}. Raises RuntimeError where no CUDA device of compute
    capability 8.0+ holds the weights, and ValueError naming the layers whose weights are not 2:4 (prune them with
    `hf_prune.oneshot(..., pattern="2:4")` or `PruningConfig(granularity="n:m", n_m="2:4")` first).
    """
    if backend not in ("auto", "cusparselt", "cutlass"):
        raise ValueError(f"to_semi_structured: backend={backend!r} is invalid: choose 'auto', 'cusparselt' or 'cutlass'.")
    modules = find_target_modules(model, tuple(targets), tuple(exclude))
    if not modules:
        raise ValueError(f"to_semi_structured: targets={list(targets)} match no Linear layer of {type(model).__name__}.")
    device = next(iter(modules.values())).weight.device
    reason = semi_structured_unavailable(device)
    if reason is not None:
        raise RuntimeError(
            f"hf_prune.to_semi_structured needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"or newer (Ampere, Hopper, ...) with the model on it: {reason}. The 2:4 zeros themselves work everywhere "
            "as ordinary dense weights."
        )
    not_two_four = [name for name, m in modules.items() if not is_conv1d(m) and not is_two_four(m.weight)]
    if not_two_four:
        raise ValueError(
            f"to_semi_structured: {len(not_two_four)} targeted layer(s) are not 2:4 sparse, e.g. {not_two_four[:3]}. "
            "Prune them to 2:4 first (hf_prune.oneshot(model, data, pattern='2:4')) or narrow targets/exclude."
        )
    from torch.sparse import (SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS,
                              to_sparse_semi_structured)

    convert = {"auto": to_sparse_semi_structured, "cusparselt": SparseSemiStructuredTensorCUSPARSELT.from_dense,
               "cutlass": SparseSemiStructuredTensorCUTLASS.from_dense}[backend]
    converted, skipped = [], {}
    for name, module in modules.items():
        if is_conv1d(module):
            skipped[name] = "Conv1D (GPT-2 layout) is not a Linear; the sparse kernels take nn.Linear weights"
            continue
        try:
            sparse = convert(module.weight.detach())
        except (RuntimeError, ValueError) as err:  # dtype or shape the kernels do not take
            skipped[name] = str(err).splitlines()[0]
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return {"converted": converted, "skipped": skipped}
