"""`oneshot`: prune a model once from a small calibration set, block by block, with no training.

The calibration batches are run up to the first transformer block; then, for each block in turn, the block (alone)
is moved to the compute device, its targeted layers' inputs are observed over all batches (Wanda's norms,
SparseGPT's Hessians), each layer is pruned, and the pruned block is run again to give the next block its inputs
-- the pruned model's own activations, as both papers do. Only one block and one block's activations are on the
device at a time, so a model that fits the device once (or only in CPU memory) can be pruned.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..config import PruningConfig
from ..linear import matrix_view, stored_layout
from ..masks import (
    check_pattern_fits,
    config_sparsity_report,
    expand_units,
    find_target_modules,
    select_lowest,
    unit_scores,
)
from ..methods import PruningMethod, available_methods, get_method
from ..methods.base import input_observer
from .blocks import decoder_blocks, first_block_inputs, hidden_states_of, with_hidden_states

logger = logging.get_logger(__name__)


@dataclass
class OneShotResult:
    """What `oneshot` did: the method and pattern, the sparsity measured on the weights, the time it took, and the
    peak memory of the compute device (CUDA only; None on CPU, where the benchmark measures the process)."""

    method: str
    pattern: str
    target_sparsity: float
    sparsity: float
    seconds: float
    blocks: int
    modules: int
    peak_device_memory_bytes: Optional[int] = None
    report: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def oneshot_methods() -> list[str]:
    """The registered pruning methods one-shot pruning can run: those that score weights without training and
    make new zeros (so not `constant`, nor the gradient-based movement methods)."""
    usable = []
    for name in available_methods():
        method = get_method(name)
        if not (method.fixed_masks or method.requires_trainer or method.needs_gradients):
            usable.append(name)
    return usable


def oneshot(
    model: nn.Module,
    calibration_dataloader: Iterable[Any],
    method: Optional[str] = None,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    targets: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    config: Optional[PruningConfig] = None,
    device: Optional[Union[str, torch.device]] = None,
    max_batches: Optional[int] = None,
    show_progress: bool = True,
) -> OneShotResult:
    """Prune `model` in place, once, from calibration data: no gradients, no training.

    Args:
        model: a Transformers decoder (Llama, Mistral, Qwen2, GPT-2, OPT, ...) or any model whose blocks sit in one
            `nn.ModuleList`. It stays where it is (CPU memory is enough); blocks visit `device` one at a time.
        calibration_dataloader: batches of `input_ids` (+ `attention_mask`), dicts or tensors; e.g. 128 sequences of
            2048 tokens in the papers, far fewer for small models.
        method: a registered method: "wanda", "sparsegpt" or "magnitude" (or any criterion with `scores`).
        sparsity: fraction of each targeted layer's weights to remove (unstructured), e.g. 0.5.
        pattern: "N:M" instead of `sparsity`, e.g. "2:4" (keep 2 of every 4 consecutive inputs; GPU sparse kernels).
        targets / exclude: module-name regexes (default: every Linear inside the blocks; `lm_head` is not pruned).
        config: a `PruningConfig` instead of the arguments above (method, target_sparsity, granularity, n_m,
            targets, exclude, sparsity_overrides); the two cannot be mixed.
        device: where each block is computed (default: where the model is). The embeddings and the calibration
            activations are put there too.
        max_batches: use at most this many calibration batches.
        show_progress: a tqdm bar over the blocks.

    Returns:
        `OneShotResult`; `sparsity_report` of the pruned model in `.report`.
    """
    config = _resolve_config(method, sparsity, pattern, targets, exclude, config)
    method_cls = config.method_class()
    if config.method not in oneshot_methods():
        why = ("keeps existing zeros and prunes nothing" if method_cls.fixed_masks else
               "scores weights from training (gradients or learned scores), which one-shot pruning has none of; prune "
               "with it while fine-tuning (PruningTrainer)")
        raise ValueError(f"hf_prune.oneshot: method={config.method!r} {why}. Choose one of {oneshot_methods()}.")
    targeted = find_target_modules(model, config.targets, config.exclude)
    if not targeted:
        raise ValueError(f"hf_prune.oneshot: targets={config.targets} (exclude={config.exclude}) match no Linear "
                         f"layer of {type(model).__name__}.")
    for name, module in targeted.items():
        check_pattern_fits(name, module, config)
    prefix, blocks = decoder_blocks(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    outside = [name for name in targeted if not name.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"hf_prune.oneshot: targets match layers outside the transformer blocks ({outside[:3]}); "
                         f"one-shot pruning prunes inside {prefix!r} only. Narrow PruningConfig.targets or add exclude.")

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    moved = _move_outside_blocks(model, prefix, device)
    try:
        inputs = first_block_inputs(model, blocks, calibration_dataloader, device, max_batches)
        for index in tqdm(range(len(blocks)), desc=f"oneshot {config.method}", disable=not show_progress):
            block = blocks[index]
            block_prefix = f"{prefix}.{index}."
            modules = {n: m for n, m in targeted.items() if n.startswith(block_prefix)}
            block.to(device)
            if modules:
                _prune_block(block, modules, inputs, config, method_cls)
            inputs = _run_block(block, inputs, keep_outputs=index + 1 < len(blocks))
            block.to(home)
    finally:
        for name, tensor in moved:
            tensor.data = tensor.data.to(home)
        model.train(was_training)
    seconds = time.perf_counter() - start
    report = config_sparsity_report(model, config)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = OneShotResult(
        method=config.method,
        pattern=config.n_m if config.granularity == "n:m" else config.granularity,
        target_sparsity=config.target_sparsity,
        sparsity=report["global_sparsity"],
        seconds=seconds,
        blocks=len(blocks),
        modules=len(targeted),
        peak_device_memory_bytes=peak,
        report=report,
    )
    logger.info("hf_prune: one-shot %s pruned %d layers of %d blocks to %.2f%% sparsity in %.1f s", config.method,
                len(targeted), len(blocks), 100 * result.sparsity, seconds)
    return result


def _resolve_config(method, sparsity, pattern, targets, exclude, config) -> PruningConfig:
    given = {k: v for k, v in dict(method=method, sparsity=sparsity, pattern=pattern, targets=targets,
                                   exclude=exclude).items() if v is not None}
    if config is not None:
        if given:
            raise ValueError(f"hf_prune.oneshot: give either config= or {sorted(given)}, not both.")
        if not isinstance(config, PruningConfig):
            raise TypeError(f"hf_prune.oneshot: config must be a PruningConfig, got {type(config).__name__}.")
        config.validate()
        return config
    return oneshot_config(method, sparsity, pattern, targets, exclude)


def oneshot_config(method: Optional[str] = None, sparsity: Optional[float] = None, pattern: Optional[str] = None,
                   targets: Optional[list[str]] = None, exclude: Optional[list[str]] = None) -> PruningConfig:
    """The PruningConfig of `oneshot`'s keyword arguments: `method` (default "wanda"), `sparsity` (default 0.5) or
    an N:M `pattern` (sparsity 1 - N/M), `targets` / `exclude` (default: PruningConfig's)."""
    if sparsity is not None and pattern is not None:
        raise ValueError(f"hf_prune.oneshot: give sparsity={sparsity!r} or pattern={pattern!r}, not both (an N:M "
                         "pattern fixes the sparsity at 1 - N/M).")
    kwargs: dict[str, Any] = {"method": method or "wanda"}
    if pattern is not None:
        probe = PruningConfig(granularity="n:m", n_m=pattern, target_sparsity=0.5)  # validates and parses `pattern`
        n, m = probe.n_m_values
        kwargs.update(granularity="n:m", n_m=pattern, target_sparsity=1 - n / m)
    else:
        kwargs["target_sparsity"] = 0.5 if sparsity is None else sparsity
    if targets is not None:
        kwargs["targets"] = list(targets)
    if exclude is not None:
        kwargs["exclude"] = list(exclude)
    return PruningConfig(**kwargs)


def _move_outside_blocks(model: nn.Module, prefix: str, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Put the parameters and buffers outside the blocks (embeddings, rotary tables, final norm) on `device`;
    returns what was moved, to be put back."""
    moved = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix + ".") and tensor.device != device:
            tensor.data = tensor.data.to(device)
            moved.append((name, tensor))
    return moved


@torch.no_grad()
def _run_block(block: nn.Module, inputs: list, keep_outputs: bool = True) -> list:
    outputs = []
    for args, kwargs in inputs:
        hidden = hidden_states_of(block(*args, **kwargs))
        if keep_outputs:
            outputs.append(with_hidden_states((args, kwargs), hidden))
    return outputs


@torch.no_grad()
def _prune_block(block: nn.Module, modules: dict[str, nn.Module], inputs: list, config: PruningConfig,
                 method_cls: type[PruningMethod]) -> None:
    method = method_cls(config)
    method.attach(modules)
    if method_cls.needs_inputs:
        hooks = [module.register_forward_pre_hook(input_observer(method, name)) for name, module in modules.items()]
        try:
            _run_block(block, inputs, keep_outputs=False)
        finally:
            for hook in hooks:
                hook.remove()
    for name, module in modules.items():
        override = config.sparsity_override(name)
        sparsity = config.target_sparsity if override is None else override
        if method_cls.one_shot_only:
            method.prune_module(name, module, sparsity)
        else:
            _select_and_zero(method, name, module, sparsity, config)
        method.detach(name)


@torch.no_grad()
def _select_and_zero(method: PruningMethod, name: str, module: nn.Module, sparsity: float,
                     config: PruningConfig) -> None:
    """Zero the lowest-scoring weights of `module`: per output row for row-wise criteria (unstructured and N:M),
    across the layer otherwise."""
    matrix = matrix_view(module, method.scores(name, module).float())
    units = unit_scores(matrix, config)
    if method.comparison_group == "row" and config.granularity != "block":
        rows = units.reshape(matrix.shape[0], -1)
        k = int(round(sparsity * rows.shape[1]))
        pruned = torch.zeros_like(rows, dtype=torch.bool)
        if k:
            pruned.scatter_(1, torch.topk(rows, k, dim=1, largest=False).indices, True)
        pruned = pruned.reshape(-1)
    else:
        pruned = select_lowest([units], sparsity)[0]
    mask = stored_layout(module, expand_units(pruned, matrix.shape, config))
    module.weight.masked_fill_(mask.to(module.weight.device), 0)
