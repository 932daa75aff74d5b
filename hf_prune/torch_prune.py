"""Models that still carry `torch.nn.utils.prune` wrappers (what blog recipes produce).

Such a module keeps `weight_orig` (a Parameter) and `weight_mask` (a buffer) and recomputes `weight` in a forward
pre-hook. hf_prune would rank and mask a `weight` that is rebuilt at every forward, and `save_pretrained` would write
`weight_orig`/`weight_mask` keys that `from_pretrained` does not know, silently re-initialising those weights. So the
wrappers are folded into plain weights (`torch.nn.utils.prune.remove`: weight = weight_orig * weight_mask) before
pruning starts, and a save that would still write them is refused.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune as torch_prune
from transformers.utils import logging

logger = logging.get_logger(__name__)


def torch_prune_wrappers(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, parameter name) of every `torch.nn.utils.prune` reparametrisation in `model`."""
    found = []
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            methods = hook._pruning_methods if isinstance(hook, torch_prune.PruningContainer) else [hook]
            for method in methods:
                if isinstance(method, torch_prune.BasePruningMethod):
                    found.append((module_name, method._tensor_name))
    return sorted(set(found))


def fold_torch_prune(model: nn.Module) -> list[str]:
    """Make every `torch.nn.utils.prune` mask permanent (weight = weight_orig * weight_mask, a plain Parameter again).

    Returns the qualified names of the folded parameters; logs a warning naming how many there were.
    """
    wrappers = torch_prune_wrappers(model)
    modules = dict(model.named_modules())
    for module_name, tensor_name in wrappers:
        torch_prune.remove(modules[module_name], tensor_name)
    names = [f"{m}.{t}" if m else t for m, t in wrappers]
    if names:
        logger.warning(
            f"hf_prune: {len(names)} parameters carried torch.nn.utils.prune masks ({names[:3]}"
            f"{' ...' if len(names) > 3 else ''}); they were folded into plain weights (weight_orig * weight_mask) "
            "before pruning, so their zeros stay zero and checkpoints load with from_pretrained."
        )
    return names


def check_no_torch_prune(model: nn.Module, action: str) -> None:
    """Refuse `action` (a save) while `model` carries wrappers: the checkpoint would not load with from_pretrained."""
    wrappers = torch_prune_wrappers(model)
    if wrappers:
        names = [f"{m}.{t}" if m else t for m, t in wrappers]
        raise ValueError(
            f"hf_prune: refusing to {action}: {len(names)} parameters carry torch.nn.utils.prune wrappers "
            f"({names[:3]}{' ...' if len(names) > 3 else ''}), which would be written as weight_orig/weight_mask "
            "keys that from_pretrained silently re-initialises. Fold them first: hf_prune.fold_torch_prune(model) "
            "(or torch.nn.utils.prune.remove on each)."
        )
