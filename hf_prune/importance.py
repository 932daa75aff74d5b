"""Which heads and FFN neurons matter: importance scores for structured pruning, and selection of what to remove.

Scores come from gates placed with forward pre-hooks on the input of the attention output projection (the
concatenated heads) and of the MLP down projection (the neurons), so they need no `head_mask` (gone in
Transformers 5.x, never present in Llama-style models) and work on already pruned models. Units are named in the
layer's ORIGINAL numbering, as `prune_heads` and `prune_ffn_neurons` expect; units already removed score 0.

- "gradient": the expected absolute gradient of the loss with respect to a per-example gate on each unit, the
  sensitivity of Michel et al. (2019), "Are Sixteen Heads Really Better than One?".
- "activation": no backward pass; the mean over tokens of the L2 norm of what the unit adds to the block output
  (a head's context slice through its columns of the output projection; a neuron's activation times the norm of
  its down-projection column). Projecting through the output weights makes a unit whose output weights are zero
  score 0, as it contributes nothing.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .masks import matrix_view
from .structure import _head_slots, _neuron_slots, _Slot, structure_summary

logger = logging.get_logger(__name__)

METHODS = ("gradient", "activation")


def _move(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's loss on a Trainer-style batch; causal language models without labels predict their input ids."""
    if "labels" not in batch and "input_ids" in batch and _is_causal_lm(model):
        batch = {**batch, "labels": batch["input_ids"]}
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None) if not isinstance(outputs, dict) else outputs.get("loss")
    if loss is None:
        raise ValueError(
            f"hf_prune: {type(model).__name__} returned no loss for a batch with keys {sorted(batch)}; gradient "
            "importance needs batches with `labels` (or a language model, which uses labels=input_ids). "
            "method='activation' needs no loss."
        )
    return loss


def _per_layer_l2_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Divide each row by its L2 norm, as in Michel et al.'s code, so layers compare on one scale."""
    norm = scores.pow(2).sum(dim=-1, keepdim=True).sqrt()
    return scores / (norm + 1e-20)


def _unit_scores(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    slots: list[_Slot],
    method: str,
    max_batches: Optional[int],
    description: str,
    progress: bool,
) -> list[torch.Tensor]:
    """Per slot, a score per ORIGINAL unit (0 for removed units), summed over batches then averaged."""
    if method not in METHODS:
        raise ValueError(f"hf_prune: importance method must be one of {METHODS}, got {method!r}.")
    device = next(model.parameters()).device
    totals = [torch.zeros(slot.total, dtype=torch.float32, device=device) for slot in slots]
    live = [slot for slot in slots if slot.module is not None]
    # Per batch: the gates (gradient) or the token mask (activation) the hooks read.
    state: dict[str, Any] = {}

    def make_hook(slot: _Slot):
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            x = args[0]
            units = len(slot.kept)
            if method == "gradient":
                gate = torch.ones(x.shape[0], units, dtype=x.dtype, device=x.device, requires_grad=True)
                state["gates"][slot.layer_idx] = gate
                scale = gate.repeat_interleave(slot.unit_width, dim=1)
                scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
                return (x * scale,) + tuple(args[1:])
            with torch.no_grad():
                w = matrix_view(module).detach().float()  # (out, units * width)
                xs = x.detach().float().reshape(x.shape[0], -1, units, slot.unit_width)
                if slot.unit_width == 1:
                    norms = xs[..., 0].abs() * w.norm(dim=0)
                else:
                    # |W_h c_h|^2 = c_h^T (W_h^T W_h) c_h: one small Gram matrix per head instead of the full product.
                    wh = w.view(w.shape[0], units, slot.unit_width)
                    gram = torch.einsum("ohd,ohe->hde", wh, wh)
                    norms = torch.einsum("bshd,hde,bshe->bsh", xs, gram, xs).clamp_min(0).sqrt()
                mask = state.get("token_mask")
                if mask is not None and mask.shape == norms.shape[:2]:
                    norms = norms * mask[..., None]
                    count = mask.sum()
                else:
                    count = torch.tensor(float(norms.shape[0] * norms.shape[1]), device=norms.device)
                state["sums"][slot.layer_idx] += norms.sum(dim=(0, 1))
                state["count"] = count
            return None

        return hook

    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    handles = [slot.module.register_forward_pre_hook(make_hook(slot)) for slot in live]
    model.eval()
    # Parameters stop requiring grad for the duration: the backward then computes gate gradients only, and no
    # parameter's `.grad` is created or changed.
    for p in model.parameters():
        p.requires_grad_(False)
    batches = 0
    try:
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        for batch in tqdm(dataloader, total=total, desc=description, disable=not progress):
            if max_batches is not None and batches >= max_batches:
                break
            batch = _move(batch, device)
            if method == "gradient":
                state["gates"] = {}
                with torch.enable_grad():
                    loss = _loss(model, batch)
                    gates = [state["gates"][slot.layer_idx] for slot in live if slot.layer_idx in state["gates"]]
                    grads = torch.autograd.grad(loss, gates, allow_unused=True) if gates else []
                for slot, grad in zip([s for s in live if s.layer_idx in state["gates"]], grads):
                    if grad is not None:
                        totals[slot.layer_idx][slot.kept] += grad.detach().abs().float().sum(dim=0)
            else:
                mask = batch.get("attention_mask")
                state["token_mask"] = mask.float() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                state["sums"] = {slot.layer_idx: torch.zeros(len(slot.kept), device=device) for slot in live}
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                count = state.get("count", torch.tensor(1.0)).clamp_min(1)
                for slot in live:
                    totals[slot.layer_idx][slot.kept] += state["sums"][slot.layer_idx] / count
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag
    if batches == 0:
        raise ValueError("hf_prune: the dataloader yielded no batches; importance needs at least one.")
    return [t / batches for t in totals]


def compute_head_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    normalize_layers: bool = True,
    method: str = "gradient",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Importance of every attention head, higher means keep.

    Args:
        model: a BERT-style, DistilBERT, GPT-2 or Llama-style Transformers model (pruned or not).
        dataloader: an iterable of Trainer-style batches (dicts with `input_ids`, `attention_mask`, `labels`);
            without `labels`, the language-modelling loss on `input_ids` is used.
        normalize_layers: divide each layer's scores by their L2 norm (Michel et al.).
        method: "gradient" (expected |dL/d gate|) or "activation" (mean norm of each head's output).
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.

    Returns:
        float32 tensor [num_layers, num_heads] in the ORIGINAL head numbering, non-negative; removed heads score 0.
        The model runs in eval mode and gets its train/eval mode back; weights, `requires_grad` and `.grad` are
        left as they were.
    """
    slots = _head_slots(model)
    rows = _unit_scores(model, dataloader, slots, method, max_batches, "head importance", progress)
    width = max(slot.total for slot in slots)
    scores = torch.zeros(len(slots), width, dtype=torch.float32)
    for slot, row in zip(slots, rows):
        scores[slot.layer_idx, : slot.total] = row.cpu()
    return _per_layer_l2_normalize(scores) if normalize_layers else scores


def compute_neuron_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    normalize_layers: bool = True,
    method: str = "gradient",
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Importance of every FFN neuron (gates on the input of the MLP down projection), higher means keep.

    Same arguments and guarantees as `compute_head_importance`. Returns {layer: float32 tensor [intermediate_size]}
    in the ORIGINAL neuron numbering; removed neurons score 0.
    """
    slots = _neuron_slots(model)
    rows = _unit_scores(model, dataloader, slots, method, max_batches, "neuron importance", progress)
    result = {}
    for slot, row in zip(slots, rows):
        row = row.cpu()
        result[slot.layer_idx] = _per_layer_l2_normalize(row[None])[0] if normalize_layers else row
    return result


def _select(
    scores: dict[int, torch.Tensor],
    fraction: float,
    already: dict[int, set[int]],
    group_size: int,
    min_per_layer: int,
    allow_remove_all: bool,
    kind: str,
) -> dict[int, list[int]]:
    """Lowest-scoring units across all layers until `fraction` of all units is gone (already removed ones count)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hf_prune: the fraction of {kind} to prune must be in [0, 1], got {fraction}.")
    total_units = sum(len(s) for s in scores.values())
    target_groups = int(round(fraction * total_units / group_size))
    candidates = []  # (score, layer, group)
    gone_groups = 0
    for layer, row in scores.items():
        if len(row) % group_size:
            raise ValueError(
                f"hf_prune: layer {layer} has {len(row)} {kind}, not a multiple of group_size={group_size}."
            )
        for g in range(len(row) // group_size):
            members = range(g * group_size, (g + 1) * group_size)
            if all(m in already.get(layer, set()) for m in members):
                gone_groups += 1
            else:
                candidates.append((float(row[g * group_size : (g + 1) * group_size].sum()), layer, g))
    live_per_layer: dict[int, int] = {}
    for _, layer, _ in candidates:
        live_per_layer[layer] = live_per_layer.get(layer, 0) + 1
    budget = target_groups - gone_groups
    if not allow_remove_all and budget >= len(candidates):
        budget = len(candidates) - 1  # keep the single most important one in the whole model
    result = {layer: set(units) for layer, units in already.items() if units}
    floor = -(-min_per_layer // group_size)  # groups that must stay per layer
    for _, layer, g in sorted(candidates):
        if budget <= 0:
            break
        if live_per_layer[layer] <= floor:
            continue
        result.setdefault(layer, set()).update(range(g * group_size, (g + 1) * group_size))
        live_per_layer[layer] -= 1
        budget -= 1
    return {layer: sorted(units) for layer, units in sorted(result.items()) if units}


def select_heads_to_prune(
    importance: torch.Tensor,
    fraction: float,
    *,
    model: Optional[nn.Module] = None,
    already_pruned: Optional[Mapping[int, Iterable[int]]] = None,
    group_size: Optional[int] = None,
    min_heads_per_layer: int = 0,
    allow_remove_all: bool = False,
) -> dict[int, list[int]]:
    """The heads to be gone so that `fraction` of all heads is removed, lowest importance first, across layers.

    Args:
        importance: [num_layers, num_heads] from `compute_head_importance`.
        fraction: target fraction of ALL original heads removed, already removed ones included (so a growing
            fraction over a schedule removes heads gradually).
        model: when given, `already_pruned` and `group_size` default to what the model records.
        already_pruned: {layer: [original head indices]} already removed.
        group_size: query heads that go together (grouped-query attention); groups are ranked by summed importance.
        min_heads_per_layer: heads every layer keeps (0: a layer may lose all heads).
        allow_remove_all: by default at least one head (group) stays in the model.

    Returns:
        {layer: sorted original head indices}, the complete set to be gone (already removed included); pass it to
        `prune_heads`, which ignores the heads already removed.
    """
    if model is not None:
        summary = structure_summary(model)
        already_pruned = summary["pruned_heads"] if already_pruned is None else already_pruned
        group_size = summary["head_group_size"] if group_size is None else group_size
    scores = {layer: importance[layer].detach().float().cpu() for layer in range(importance.shape[0])}
    already = {int(k): {int(h) for h in v} for k, v in (already_pruned or {}).items()}
    return _select(scores, fraction, already, group_size or 1, min_heads_per_layer, allow_remove_all, "heads")


def select_neurons_to_prune(
    importance: Mapping[int, torch.Tensor],
    fraction: float,
    *,
    model: Optional[nn.Module] = None,
    already_pruned: Optional[Mapping[int, Iterable[int]]] = None,
    min_neurons_per_layer: int = 0,
    allow_remove_all: bool = False,
) -> dict[int, list[int]]:
    """The FFN neurons to be gone so that `fraction` of all neurons is removed, lowest importance first, globally.

    Same conventions as `select_heads_to_prune`: `importance` from `compute_neuron_importance`, original numbering,
    already removed neurons count towards `fraction` and are part of the result, at least one neuron stays in the
    model unless `allow_remove_all`.
    """
    if model is not None and already_pruned is None:
        already_pruned = structure_summary(model)["pruned_neurons"]
    scores = {int(layer): row.detach().float().cpu() for layer, row in importance.items()}
    already = {int(k): {int(n) for n in v} for k, v in (already_pruned or {}).items()}
    return _select(scores, fraction, already, 1, min_neurons_per_layer, allow_remove_all, "neurons")
