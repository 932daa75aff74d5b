"""`hf-prune optimize` on a causal LM (hf_prune.commands.optimize_lm): a tiny Llama (grouped-query attention) saved
with a local tokenizer, small text files; the whole road (importance, candidates, cut, distilled recovery, report)
through the real Trainer, and the result reloaded and generating with its key/value cache."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import WORDS, tiny_causal_lm, tiny_tokenizer

from hf_prune import load_pruned, structure_summary
from hf_prune.cli import main
from hf_prune.export import is_onnx_available
from hf_prune.plot import is_matplotlib_available
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
    assert optimize_lm(lm_files, out, "--target_params", "0.8", "--search_axes", "false") == 0
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
    # Layers that lost different heads have no plain config for Optimum's cache: the report says why, no graph.
    assert "skipped" in report["onnx_decode"] and not (out / "onnx").exists()
    assert ("structure record" if is_onnx_available() else "onnx extra") in report["onnx_decode"]["skipped"]
    assert (out / "report.png").is_file() == is_matplotlib_available()

    model = load_pruned(str(out / "model")).eval()
    assert sum(structure_summary(model)["heads_per_layer"]) < 8
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                           model.generate(prompt, use_cache=False, **kwargs))


def test_a_speed_target_out_of_reach_is_not_met_and_reports_the_closest_shape(lm_files, tmp_path):
    out = tmp_path / "out"
    assert optimize_lm(lm_files, out, "--target_speedup", "50", "--max_fraction", "0.5", "--search_axes", "false") == 0
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
    with pytest.raises(SystemExit, match="--search_axes true searches depth and width itself"):
        optimize_lm(lm_files, tmp_path / "d", "--target_params", "0.8", "--search_axes", "true",
                    "--layers_to_remove", "1")
    with pytest.raises(SystemExit, match="--layer_importance 'shortgpt' is not a registered layer criterion"):
        optimize_lm(lm_files, tmp_path / "e", "--target_params", "0.8", "--layer_importance", "shortgpt")
    with pytest.raises(SystemExit, match="--search_steps -1 is invalid"):
        optimize_lm(lm_files, tmp_path / "f", "--target_params", "0.8", "--search_steps", "-1")


@pytest.fixture(scope="module")
def deeper_lm(tmp_path_factory, lm_files):
    """Four layers, so that depth has room and depth+width (half that depth) is searched too."""
    root = tmp_path_factory.mktemp("deeper")
    tiny_causal_lm("llama", layers=4).save_pretrained(root / "model")
    tiny_tokenizer(root / "model").save_pretrained(root / "model")
    for name in ("train.txt", "held_out.txt"):
        (root / name).write_text((lm_files / name).read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.mark.parametrize("search_steps", [0, 2])
def test_the_default_search_compares_each_axis_family_at_the_target_and_keeps_the_lowest_perplexity(
        deeper_lm, tmp_path, search_steps):
    out = tmp_path / "out"
    assert optimize_lm(deeper_lm, out, "--target_params", "0.7", "--search_steps", str(search_steps)) == 0
    report = json.loads((out / "report.json").read_text())
    candidates = report["candidates"]
    families = list(dict.fromkeys(c["axes"] for c in candidates))
    # Width first, as Minitron recommends; depth+width takes half the layers the depth family needed.
    assert families == ["heads+neurons", "hidden", "hidden+heads+neurons", "depth", "depth+width"]
    finalists = []
    for family in families:
        walked = [c for c in candidates if c["axes"] == family]
        assert walked[-1]["params_ratio"] <= 0.7 and all(c["params_ratio"] > 0.7 for c in walked[:-1])
        finalists.append(walked[-1])
    depth = finalists[3]["layers_removed"]
    assert depth >= 2 and all(c["layers_removed"] == depth // 2 for c in candidates if c["axes"] == "depth+width")
    key = "perplexity_after_search" if search_steps else "perplexity_after_cut"
    assert all(c["perplexity_after_cut"] > 0 for c in finalists)
    assert all((c["perplexity_after_search"] is not None) == bool(search_steps) for c in finalists)
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0][key] == min(c[key] for c in finalists)
    assert report["chosen"]["axes"] == chosen[0]["axes"] and report["target"]["met"]
    # The saved model is the chosen shape.
    model = load_pruned(str(out / "model"))
    assert sum(p.numel() for p in model.parameters()) / report["models"]["dense"]["parameters"] == pytest.approx(
        chosen[0]["params_ratio"])
    assert structure_summary(model)["num_layers"] == 4 - chosen[0]["layers_removed"]
    text = (out / "report.md").read_text()
    assert "| depth+width |" in text and "ties go to width" in text


def test_text_from_a_dataset_folder_by_dataset_name(lm_files, tmp_path):
    """--dataset_name reads what `datasets.load_dataset` reads (a Hub id, or here a local folder of splits)."""
    data = tmp_path / "data"
    data.mkdir()
    for split, name in (("train", "train.txt"), ("validation", "held_out.txt")):
        rows = [json.dumps({"body": d}) for d in read_documents(str(lm_files / name), "text")]
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["optimize", "--model_name_or_path", str(lm_files / "model"), "--dataset_name", str(data),
                 "--text_columns", "body", "--block_size", "16", "--max_steps", "1", "--calibration_batches", "1",
                 "--per_device_train_batch_size", "4", "--eval_tokens", "200", "--prompt_tokens", "8",
                 "--decode_tokens", "2", "--benchmark_rounds", "1", "--fraction_step", "0.25", "--search_axes",
                 "false", "--target_params", "0.8", "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["description"] == f"{data} (train / validation)"
    assert report["data"]["train_tokens"] > 500 and report["data"]["held_out_tokens"] == 200
    with pytest.raises(SystemExit, match="--text_columns 'text' is not a column"):
        main(["optimize", "--model_name_or_path", str(lm_files / "model"), "--dataset_name", str(data),
              "--target_params", "0.8", "--output_dir", str(tmp_path / "bad")])


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
    assert optimize_lm(lm_files, out, "--target_params", "0.8", "--uniform_layers", "--search_axes", "false") == 0
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
    # A plain config: Optimum exports it with a key/value cache, timed beside the dense model.
    onnx = json.loads((out / "report.json").read_text())["onnx_decode"]
    if is_onnx_available():
        assert onnx["optimized"]["decode_tokens_per_s"] > 0 and onnx["dense"]["prefill_ms"] > 0
        assert (out / "onnx" / "optimized" / "model.onnx").is_file() and not (out / "onnx" / "dense").exists()
        assert "ONNX Runtime with the key/value cache" in (out / "report.md").read_text()
    else:
        assert "onnx extra" in onnx["skipped"]


def test_a_result_with_the_same_shapes_in_every_layer_gets_a_plain_config(tmp_path):
    """Depth or width pruning leaves every layer alike: the saved folder then loads with plain from_pretrained (and
    exports with Optimum); a folder whose layers differ keeps its structure record untouched."""
    from transformers import AutoModelForCausalLM

    from hf_prune.commands.optimize_lm import plain_when_uniform
    from hf_prune.structure import prune_heads, prune_hidden, prune_layers

    model = tiny_causal_lm("llama", layers=3).eval()
    prune_layers(model, [1])
    prune_hidden(model, list(range(0, 64, 8)))
    model.save_pretrained(tmp_path / "uniform")
    assert "hf_prune_structure" in json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert plain_when_uniform(str(tmp_path / "uniform"))
    config = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert "hf_prune_structure" not in config and config["num_hidden_layers"] == 2
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "uniform")).eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(prompt).logits, model(prompt).logits)

    uneven = tiny_causal_lm("llama", layers=2).eval()
    prune_heads(uneven, {0: [0, 1]})
    uneven.save_pretrained(tmp_path / "uneven")
    before = {p.name: p.read_bytes() for p in (tmp_path / "uneven").iterdir()}
    assert not plain_when_uniform(str(tmp_path / "uneven"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "uneven").iterdir()} == before


def test_training_arguments_reach_the_recovery(lm_files, tmp_path):
    """Every TrainingArguments flag applies to the recovery: bf16 autocast and gradient accumulation here."""
    out = tmp_path / "out"
    assert optimize_lm(lm_files, out, "--target_params", "0.8", "--search_axes", "false", "--bf16", "--use_cpu",
                       "--gradient_accumulation_steps", "2", "--save_strategy", "steps", "--save_steps", "3") == 0
    state = json.loads((out / "recovery" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["max_steps"] == 3
    # Two batches of 4 windows per step: an epoch of 75 windows takes 10 steps, not 19.
    assert state["log_history"][0]["epoch"] == pytest.approx(0.1, abs=0.01)
    settings = json.loads((out / "report.json").read_text())["settings"]["training_arguments"]
    assert settings["bf16"] and settings["gradient_accumulation_steps"] == 2
    assert load_pruned(str(out / "recovery" / "checkpoint-3")).num_parameters() == \
        load_pruned(str(out / "model")).num_parameters()


def test_a_rerun_continues_from_the_finished_phases_and_refuses_those_of_other_options(lm_files, tmp_path, caplog):
    import shutil

    out = tmp_path / "out"
    argv = ["--target_params", "0.8", "--search_axes", "false", "--onnx_decode", "false", "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2"]
    assert optimize_lm(lm_files, out, *argv) == 0
    whole = load_pruned(str(out / "model")).state_dict()
    assert sorted(p.name for p in (out / "phases").iterdir()) == ["importance.pt", "recovery.pt",
                                                                   "recovery_started.pt", "search.pt"]
    # The same command again: every phase reused, nothing trained.
    assert optimize_lm(lm_files, out, *argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["phases_reused"] == ["importance", "search", "recovery"]
    assert "recovery_seconds" not in report["phases"]
    # Killed after checkpoint-2 (the model, its phase and the later checkpoint never written): it continues there.
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "recovery" / "checkpoint-4")
    (out / "phases" / "recovery.pt").unlink()
    with caplog.at_level("INFO", logger="hf_prune.commands.optimize_lm"):
        assert optimize_lm(lm_files, out, *argv) == 0
    assert "continuing from" in caplog.text and "checkpoint-2" in caplog.text
    for name, tensor in load_pruned(str(out / "model")).state_dict().items():
        torch.testing.assert_close(tensor, whole[name], msg=name)
    # Other options: the phase they change is refused, naming the difference.
    with pytest.raises(SystemExit, match=r"recovery.pt holds the recovery phase of another run \(training.max_steps: 4 "
                                         r"then, 5 now\)"):
        optimize_lm(lm_files, out, *[a if a != "4" else "5" for a in argv])
    with pytest.raises(SystemExit, match=r"importance.pt holds the importance phase of another run \(importance: "
                                         r"'activation' then, 'taylor' now\)"):
        optimize_lm(lm_files, out, *argv, "--importance", "taylor")
    assert optimize_lm(lm_files, out, *argv, "--importance", "taylor", "--resume_phases", "false") == 0
    assert json.loads((out / "report.json").read_text())["phases_reused"] == []


@pytest.mark.parametrize("name, content, option, message", [
    ("missing.txt", None, "--train_file", "does not exist"),
    ("folder.txt", "folder", "--train_file", "does not exist"),
    ("data.parquet", "x", "--train_file", "give a .txt, .json, .jsonl or .csv file"),
    ("empty.txt", "\n\n  \n", "--train_file", "holds no text"),
    ("binary.txt", "a\x00b", "--train_file", "is not text (it holds NUL bytes)"),
    ("empty.txt", "", "--validation_file", "holds no text"),
    ("broken.jsonl", "{not json", "--train_file", "could not be read as json"),
])
def test_bad_text_files_are_refused_naming_the_option_before_any_model_is_loaded(lm_files, tmp_path, name, content,
                                                                                  option, message, monkeypatch):
    import hf_prune.commands.optimize_lm as module

    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    files = {"--train_file": str(lm_files / "train.txt"), "--validation_file": str(lm_files / "held_out.txt"),
             option: str(path)}
    monkeypatch.setattr(module, "load_pruned", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit, match=re.escape(f"{option} '{path}'") + ".*" + re.escape(message)):
        main(["optimize", "--model_name_or_path", str(lm_files / "model"), "--target_params", "0.8",
              "--output_dir", str(tmp_path / "out"), *[x for kv in files.items() for x in kv]])
