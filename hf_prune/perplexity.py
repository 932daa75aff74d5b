"""Perplexity of a causal language model on a text, with a sliding window (the measure one-shot LLM pruning is
judged by: WikiText perplexity in the Wanda and SparseGPT papers)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    """exp(mean negative log-likelihood) over `tokens` predicted tokens, from `windows` windows of at most `window`
    tokens moved by `stride`."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    texts: Optional[Union[str, Sequence[str]]] = None,
    tokenizer=None,
    input_ids: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 1,
    max_tokens: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` on `texts` (joined by blank lines and tokenized) or on a 1-D `input_ids` tensor.

    Every token after the first is predicted exactly once. Windows of `window` tokens (default: the model's maximum
    positions, at most 1024) start every `stride` tokens (default: `window`, no overlap); with a smaller stride each
    window predicts only its last `stride` tokens and the ones before are context, which lowers perplexity towards
    what the model achieves with full context (the Transformers guide "Perplexity of fixed-length models").

    Args:
        batch_size: windows evaluated together (all of equal length; the last one alone).
        max_tokens: evaluate only the first this many tokens.
        device: where to compute (default: where the model is).
    """
    ids = _token_ids(texts, tokenizer, input_ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"hf_prune.evaluate_perplexity: the text has {ids.numel()} token(s); at least 2 are needed.")
    window = window if window is not None else min(_max_positions(model) or 1024, 1024)
    stride = stride if stride is not None else window
    for option, value in (("window", window), ("stride", stride), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"hf_prune.evaluate_perplexity: {option}={value!r} is invalid: give a positive integer.")
    if stride > window:
        raise ValueError(f"hf_prune.evaluate_perplexity: stride={stride} exceeds window={window}: tokens between "
                         "windows would never be predicted. Give stride <= window.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # (start, end, first predicted position within the window) of every window
    spans, predicted_until = [], 0
    for start in range(0, ids.numel() - 1, stride):
        end = min(start + window, ids.numel())
        spans.append((start, end, max(predicted_until - start, 1)))
        predicted_until = end
        if end == ids.numel():
            break
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        batches = [spans[i:i + batch_size] for i in range(0, len(spans), batch_size)]
        for batch in tqdm(batches, desc="perplexity", disable=not show_progress):
            for group in _equal_lengths(batch):
                windows = torch.stack([ids[s:e] for s, e, _ in group]).to(device)
                logits = model(input_ids=windows, use_cache=False).logits.float()
                nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
                for row, (_, _, first) in enumerate(group):
                    # position p of the window predicts token p; tokens before `first` were predicted earlier
                    total_nll += float(nll[row, first - 1:].double().sum())
                    total_tokens += nll.shape[1] - (first - 1)
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(spans),
                            window=window, stride=stride)


def _token_ids(texts, tokenizer, input_ids) -> torch.Tensor:
    if (texts is None) == (input_ids is None):
        raise ValueError("hf_prune.evaluate_perplexity: give either texts= (with tokenizer=) or input_ids=.")
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"hf_prune.evaluate_perplexity: input_ids must be one sequence (1-D, or 1 x N), got shape "
                             f"{tuple(ids.shape)}.")
        return ids.long()
    if tokenizer is None:
        raise ValueError("hf_prune.evaluate_perplexity: texts= needs tokenizer= (the model's tokenizer).")
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _max_positions(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _equal_lengths(spans: list) -> list[list]:
    groups: dict[int, list] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    return list(groups.values())
