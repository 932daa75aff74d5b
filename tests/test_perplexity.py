"""evaluate_perplexity: every token predicted once, the same as Transformers' own loss where they overlap."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_causal_lm, tiny_tokenizer
from hf_prune import evaluate_perplexity


def tokens(n: int = 150, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_non_overlapping_windows_equal_the_models_own_loss():
    model = tiny_causal_lm("llama")
    ids = tokens()
    result = evaluate_perplexity(model, input_ids=ids, window=32)
    total = count = 0
    with torch.no_grad():
        for start in range(0, ids.numel(), 32):
            window = ids[start:start + 32][None]
            if window.shape[1] < 2:
                continue
            total += model(input_ids=window, labels=window).loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert result.tokens == count and result.windows == 5
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_a_sliding_window_predicts_every_token_once_whatever_the_batching(arch):
    model = tiny_causal_lm(arch)
    ids = tokens()
    one = evaluate_perplexity(model, input_ids=ids, window=32, stride=8, batch_size=1)
    many = evaluate_perplexity(model, input_ids=ids[None], window=32, stride=8, batch_size=5)
    assert one.tokens == many.tokens == ids.numel() - 1
    assert one.perplexity == pytest.approx(many.perplexity, rel=1e-5)
    # With the whole sequence in one window, the context is complete: the reference value.
    full = evaluate_perplexity(model, input_ids=ids[:64], window=64)
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids[None, :64], labels=ids[None, :64]).loss.item())
    assert full.perplexity == pytest.approx(expected, rel=1e-5)


def test_texts_are_tokenized_and_joined(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    model = tiny_causal_lm("llama")
    texts = ["good bad meh"] * 20
    result = evaluate_perplexity(model, texts=texts, tokenizer=tokenizer, max_tokens=40)
    assert result.tokens == 39 and result.perplexity > 1


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"either texts= \(with tokenizer=\) or input_ids="),
    ({"texts": ["a"]}, r"texts= needs tokenizer="),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, r"one sequence"),
    ({"input_ids": torch.zeros(1, dtype=torch.long)}, r"at least 2 are needed"),
    ({"input_ids": tokens(), "window": 0}, r"window=0 is invalid"),
    ({"input_ids": tokens(), "window": 8, "stride": 16}, r"stride=16 exceeds window=8"),
    ({"input_ids": tokens(), "batch_size": 1.5}, r"batch_size=1.5 is invalid"),
])
def test_bad_perplexity_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(tiny_causal_lm("llama"), **kwargs)
