"""PruningConfig: validation names the bad option and value; dict/JSON/YAML/save_pretrained and CLI round trips."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from transformers import HfArgumentParser

from hf_prune.config import CONFIG_NAME, DEFAULT_TARGETS, PruningConfig


def _custom_config() -> PruningConfig:
    return PruningConfig(
        method="movement",
        target_sparsity=0.75,
        initial_sparsity=0.1,
        schedule="linear",
        warmup_fraction=0.2,
        cooldown_fraction=0.25,
        pruning_interval=5,
        granularity="block",
        block_shape="4x8",
        scope="local",
        targets=[r"encoder\.layer\.\d+\.", r"attention"],
        exclude=[r"output\.dense"],
        sparsity_overrides={r"intermediate\.dense": 0.5},
    )


def test_defaults_validate():
    config = PruningConfig()
    config.validate()
    assert config.method == "magnitude"
    assert config.target_sparsity == 0.9
    assert config.schedule == "cubic"
    assert config.granularity == "unstructured"
    assert config.scope == "local"
    assert config.targets == list(DEFAULT_TARGETS)
    assert config.sparsity_overrides == {}
    # Mutable defaults are per instance.
    config.targets.append("x")
    assert PruningConfig().targets == list(DEFAULT_TARGETS)


@pytest.mark.parametrize(
    "kwargs, option, value",
    [
        ({"method": "random"}, "method", "random"),
        ({"target_sparsity": 1.0}, "target_sparsity", 1.0),
        ({"target_sparsity": -0.1}, "target_sparsity", -0.1),
        ({"schedule": "exponential"}, "schedule", "exponential"),
        ({"granularity": "channel"}, "granularity", "channel"),
        ({"granularity": "block", "block_shape": "3y4"}, "block_shape", "3y4"),
        ({"granularity": "n:m", "n_m": "4:2", "target_sparsity": 0.5}, "n_m", "4:2"),
        ({"granularity": "n:m", "n_m": "2:4", "target_sparsity": 0.9}, "target_sparsity", 0.9),
        ({"warmup_fraction": 0.5, "cooldown_fraction": 0.5}, "warmup_fraction", 0.5),
        ({"pruning_interval": 0}, "pruning_interval", 0),
        ({"targets": ["layer.(\\d+"]}, "targets", "layer.(\\d+"),
        ({"sparsity_overrides": {"attention": 1.5}}, "sparsity_overrides", 1.5),
    ],
)
def test_bad_input_names_option_and_value(kwargs, option, value):
    with pytest.raises(ValueError) as info:
        PruningConfig(**kwargs)
    message = str(info.value)
    assert f"PruningConfig.{option}" in message
    assert repr(value) in message


def test_warmup_plus_cooldown_message_names_both():
    with pytest.raises(ValueError, match="cooldown_fraction"):
        PruningConfig(warmup_fraction=0.6, cooldown_fraction=0.4)


def test_n_m_with_matching_target_is_valid():
    config = PruningConfig(granularity="n:m", n_m="1:4", target_sparsity=0.75)
    assert config.n_m_values == (1, 4)


def test_dict_round_trip():
    config = _custom_config()
    data = config.to_dict()
    assert data["sparsity_overrides"] == {r"intermediate\.dense": 0.5}
    assert PruningConfig.from_dict(data) == config
    assert PruningConfig.from_dict(data) != PruningConfig()


def test_from_dict_unknown_key_is_named():
    with pytest.raises(ValueError, match="target_sparsty"):
        PruningConfig.from_dict({"target_sparsty": 0.5})


def test_json_round_trip(tmp_path):
    config = _custom_config()
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string(), encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8"))["block_shape"] == "4x8"
    assert PruningConfig.from_json(str(path)) == config


def test_yaml_round_trip(tmp_path):
    config = _custom_config()
    path = tmp_path / "pruning.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    assert PruningConfig.from_yaml(str(path)) == config


def test_yaml_section(tmp_path):
    config = _custom_config()
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump({"model": "tiny-bert", "training": {"learning_rate": 3e-5}, "pruning": config.to_dict()}),
        encoding="utf-8",
    )
    assert PruningConfig.from_yaml(str(path), section="pruning") == config
    # Without the section the job keys are unknown PruningConfig options.
    with pytest.raises(ValueError, match="training"):
        PruningConfig.from_yaml(str(path))


def test_yaml_invalid_value_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: movement\ntarget_sparsity: 1.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="target_sparsity"):
        PruningConfig.from_yaml(str(path))


def test_save_pretrained_round_trip(tmp_path):
    config = _custom_config()
    path = config.save_pretrained(str(tmp_path / "out"))
    assert os.path.basename(path) == CONFIG_NAME
    assert os.path.isfile(path)
    assert PruningConfig.from_pretrained(str(tmp_path / "out")) == config


def test_hf_argument_parser():
    parser = HfArgumentParser(PruningConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--method", "movement", "--target_sparsity", "0.8", "--targets", "a", "b"]
    )
    assert config == PruningConfig(method="movement", target_sparsity=0.8, targets=["a", "b"])
    assert config.method == "movement"
    assert config.target_sparsity == 0.8
    assert config.targets == ["a", "b"]
    assert config.granularity == "unstructured"
    assert config.sparsity_overrides == {}


def test_hf_argument_parser_validates():
    parser = HfArgumentParser(PruningConfig)
    with pytest.raises(ValueError, match="PruningConfig.method"):
        parser.parse_args_into_dataclasses(["--method", "random"])


def test_hf_argument_parser_sparsity_overrides_json():
    parser = HfArgumentParser(PruningConfig)
    (config,) = parser.parse_args_into_dataclasses(["--sparsity_overrides", '{"attention": 0.5}'])
    assert config.sparsity_overrides == {"attention": 0.5}
    # The parsed dict is validated like any other.
    with pytest.raises(ValueError, match="sparsity_overrides"):
        parser.parse_args_into_dataclasses(["--sparsity_overrides", '{"attention": 1.5}'])


def test_sparsity_overrides_json_string_round_trips():
    config = PruningConfig(sparsity_overrides='{"attention": 0.5}')
    assert config.sparsity_overrides == {"attention": 0.5}
    assert PruningConfig.from_dict(config.to_dict()) == config
