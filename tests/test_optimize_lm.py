"""`hf-prune optimize` on a causal LM (hf_prune.commands.optimize_lm): a tiny Llama (grouped-query attention) saved
with a local tokenizer, small text files; the whole road (importance, candidates, cut, distilled recovery, report)
through the real Trainer, and the result reloaded and generating with its key/value cache."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import WORDS, tiny_causal_lm, tiny_tokenizer

from hf_prune import load_pruned, structure_summary
from hf_prune.cli import main
from hf_prune.commands.optimize_lm import Windows, read_documents


def documents(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(n))


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tokenizer = tiny_tokenizer(root / "model")
    tiny_causal_lm("llama", layers=2).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.txt").write_text(documents(40, 0), encoding="utf-8")
    (root / "held_out.txt").write_text(documents(8, 1), encoding="utf-8")
    return root


def optimize_lm(root, out, *extra):
    return main(["optimize", "--model_name_or_path", str(root / "model"), "--train_file", str(root / "train.txt"),
                 "--validation_file", str(root / "held_out.txt"), "--block_size", "16", "--max_steps", "3",
                 "--per_device_train_batch_size", "4", "--calibration_batches", "2", "--eval_tokens", "300",
                 "--prompt_tokens", "8", "--decode_tokens", "4", "--benchmark_rounds", "1", "--timing_rounds", "1",
                 "--fraction_step", "0.25", "--logging_steps", "1", "--output_dir", str(out), *extra])


def test_a_causal_lm_is_optimized_to_a_parameter_target_and_generates_with_its_cache(lm_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert optimize_lm(lm_files, out, "--target_params", "0.8") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm" and report["target"]["met"] and report["target"]["params_met"]
    optimized, dense = report["models"]["optimized"], report["models"]["dense"]
    assert optimized["params_ratio"] <= 0.8 and optimized["parameters"] < dense["parameters"]
    assert optimized["perplexity"] > 0 and optimized["perplexity_after_cut"] > 0 and dense["decode_tokens_per_s"] > 0
    # The least pruning that meets the target: the candidate before the chosen one did not.
    fractions = [c["fraction"] for c in report["candidates"]]
    assert report["chosen"]["fraction_removed"] == fractions[-1]
    assert all(c["params_ratio"] > 0.8 for c in report["candidates"][:-1])
    text = (out / "report.md").read_text()
    assert "causal LM): met" in text and "| optimized |" in text and "held-out perplexity" in text

    model = load_pruned(str(out / "model")).eval()
    assert sum(structure_summary(model)["heads_per_layer"]) < 8
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                           model.generate(prompt, use_cache=False, **kwargs))


def test_a_speed_target_out_of_reach_is_not_met_and_reports_the_closest_shape(lm_files, tmp_path):
    out = tmp_path / "out"
    assert optimize_lm(lm_files, out, "--target_speedup", "50", "--max_fraction", "0.5") == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["target"]["met"] and not report["target"]["speedup_met"]
    assert [c["fraction"] for c in report["candidates"]] == [0.25, 0.5]
    assert all(c["decode_speedup"] > 0 for c in report["candidates"])
    assert report["chosen"]["fraction_removed"] == 0.5
    assert "NOT MET" in (out / "report.md").read_text()


def test_bad_targets_for_a_causal_lm_are_refused_naming_the_option(lm_files, tmp_path):
    with pytest.raises(SystemExit, match="--max_accuracy_drop is an accuracy budget for classifiers"):
        optimize_lm(lm_files, tmp_path / "a", "--max_accuracy_drop", "1")
    with pytest.raises(SystemExit, match="--target_params 1.5 is invalid"):
        optimize_lm(lm_files, tmp_path / "b", "--target_params", "1.5")
    with pytest.raises(SystemExit, match="--validation_file"):
        main(["optimize", "--model_name_or_path", str(lm_files / "model"), "--train_file",
              str(lm_files / "train.txt"), "--target_params", "0.5", "--output_dir", str(tmp_path / "c")])


def test_text_files_split_into_documents_and_windows(tmp_path):
    (tmp_path / "a.txt").write_text("one doc\nstill one\n\nsecond doc\n\n\nthird", encoding="utf-8")
    (tmp_path / "b.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert read_documents(str(tmp_path / "a.txt"), "text") == ["one doc\nstill one", "second doc", "third"]
    assert read_documents(str(tmp_path / "b.txt"), "text") == ["line one", "line two"]
    windows = Windows(torch.arange(50), 16)
    assert len(windows) == 3 and torch.equal(windows[1]["input_ids"], torch.arange(16, 32))
    assert torch.equal(windows[1]["labels"], windows[1]["input_ids"])


def test_uniform_layers_give_a_model_plain_from_pretrained_loads(lm_files, tmp_path):
    """--uniform_layers: every layer keeps the same heads and neurons, and the saved config says so."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert optimize_lm(lm_files, out, "--target_params", "0.8", "--uniform_layers") == 0
    plain = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    ours = load_pruned(str(out / "model")).eval()
    summary = structure_summary(plain)
    assert len(set(summary["heads_per_layer"])) == 1 and summary["heads_per_layer"][0] < 4
    assert len(set(summary["intermediate_sizes"])) == 1 and summary["intermediate_sizes"][0] < 128
    config = json.loads((out / "model" / "config.json").read_text())
    assert "hf_prune_structure" not in config and config["num_attention_heads"] == summary["heads_per_layer"][0]
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(plain(prompt).logits, ours(prompt).logits)
        assert torch.equal(plain.generate(prompt, **kwargs), plain.generate(prompt, use_cache=False, **kwargs))
