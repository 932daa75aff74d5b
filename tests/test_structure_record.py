"""Every save path carries the shapes: plain `save_pretrained` -> `load_pruned`, and versioned files load forward."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import build_model, logits, make_batches

from hf_prune import PruningConfig, load_pruned, prune_ffn_neurons, prune_heads
from hf_prune.structure import CONFIG_ATTR, STRUCTURE_NAME, structure_summary

CASES = {
    # BERT: layer 0 loses every head, layer 1 one head.
    "bert": ({0: [0, 1, 2, 3], 1: [2]}, {0: [1, 5, 9], 1: list(range(0, 64, 4))}),
    "roberta": ({0: [1], 1: [0, 3]}, {1: [0, 2, 4]}),
    "gpt2": ({0: [3], 1: [0, 1]}, {0: list(range(10))}),
    # Llama with grouped-query attention (2 query heads per key/value head): whole groups go.
    "llama": ({0: [2, 3], 1: [0, 1, 4, 5]}, {0: [3, 7], 1: [0]}),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_plain_save_pretrained_reloads_with_load_pruned(tmp_path, arch):
    heads, neurons = CASES[arch]
    model = build_model(arch)
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    model.save_pretrained(str(tmp_path))  # no hf_prune call: the record travels in config.json
    assert not (tmp_path / STRUCTURE_NAME).exists()
    record = json.loads((tmp_path / "config.json").read_text())[CONFIG_ATTR]
    assert record["format_version"] == 1
    assert record["pruned_heads"] == {str(k): sorted(v) for k, v in heads.items()}
    assert record["pruned_neurons"] == {str(k): sorted(v) for k, v in neurons.items()}

    loaded = load_pruned(str(tmp_path))
    batch = make_batches(arch, n=1)[0]
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)
    assert structure_summary(loaded)["heads_per_layer"] == structure_summary(model)["heads_per_layer"]
    assert structure_summary(loaded)["intermediate_sizes"] == structure_summary(model)["intermediate_sizes"]
    # Saved again from the reloaded model, the record is the same.
    assert getattr(loaded.config, CONFIG_ATTR)["pruned_neurons"] == record["pruned_neurons"]


def test_record_disappears_when_nothing_is_pruned_and_tracks_every_change():
    model = build_model("bert")
    assert not hasattr(model.config, CONFIG_ATTR)
    prune_heads(model, {1: [0]})
    assert getattr(model.config, CONFIG_ATTR)["heads_per_layer"] == [4, 3]
    prune_ffn_neurons(model, {0: [0, 1]})
    assert getattr(model.config, CONFIG_ATTR)["intermediate_sizes"] == [62, 64]


def test_newer_structure_record_warns_and_loads(tmp_path, caplog):
    model = build_model("bert")
    prune_heads(model, {0: [1]})
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config[CONFIG_ATTR]["format_version"] = 99
    config[CONFIG_ATTR]["pruned_channels"] = {"0": [1]}  # something a future version might add
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        loaded = load_pruned(str(tmp_path))
    assert "newer hf_prune" in caplog.text and "pruned_channels" in caplog.text
    assert structure_summary(loaded)["heads_per_layer"] == [3, 4]


def test_malformed_structure_file_names_the_file(tmp_path):
    model = build_model("bert")
    prune_heads(model, {0: [1]})
    model.save_pretrained(str(tmp_path))
    (tmp_path / STRUCTURE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=STRUCTURE_NAME):
        load_pruned(str(tmp_path))


def test_pruning_config_from_a_newer_version_warns_and_ignores_unknown_keys(tmp_path, caplog):
    path = PruningConfig(target_sparsity=0.7).save_pretrained(str(tmp_path))
    data = json.loads(open(path).read())
    assert data["format_version"] == 1
    data.update(format_version=2, future_option="x")
    (tmp_path / "pruning_config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        config = PruningConfig.from_pretrained(str(tmp_path))
    assert config.target_sparsity == 0.7 and "future_option" in caplog.text
    # The same unknown key in a file of this version is a typo and fails, naming it.
    data["format_version"] = 1
    (tmp_path / "pruning_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="future_option"):
        PruningConfig.from_pretrained(str(tmp_path))


def test_pruner_state_from_a_newer_version_warns_and_loads(tmp_path, caplog):
    from conftest import tiny_bert

    from hf_prune import Pruner
    from hf_prune.pruner import STATE_NAME

    config = PruningConfig(method="movement", target_sparsity=0.5)
    source = Pruner(tiny_bert(), config)
    source.start(10)
    source.prune_to(0.5)
    state = source.state_dict()
    assert state["format_version"] == 2
    state.update(format_version=7, something_new=torch.ones(2))
    torch.save(state, tmp_path / STATE_NAME)
    target = Pruner(tiny_bert(), config)
    with caplog.at_level(logging.WARNING):
        target.load(str(tmp_path))
    assert "something_new" in caplog.text
    for name in source.modules:
        assert torch.equal(target.masks[name], source.masks[name])


def test_pruner_state_of_format_1_still_loads(tmp_path):
    from conftest import tiny_bert

    from hf_prune import Pruner

    config = PruningConfig(method="movement", target_sparsity=0.5)
    source = Pruner(tiny_bert(), config)
    for scores in source.scores.values():
        scores.normal_()
    source.start(10)
    source.prune_to(0.5)
    state = source.state_dict()
    old = {k: v for k, v in state.items() if k not in ("format_version", "method")}
    old["scores"] = state["method"]["scores"]  # how version 1 stored them
    target = Pruner(tiny_bert(), config)
    target.load_state_dict(old)
    for name in source.modules:
        assert torch.equal(target.scores[name], source.scores[name])
        assert torch.equal(target.masks[name], source.masks[name])
