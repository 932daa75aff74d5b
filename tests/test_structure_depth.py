"""Depth pruning: whole layers removed; outputs equal to the model with those blocks skipped, caches and generate,
bookkeeping, records in the original numbering, reload, composition with heads, neurons and hidden channels, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from conftest import ARCHS, HEADS, build_deep_model, layers_of, logits, make_batches

from hf_prune import (
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    prune_hidden,
    prune_layers,
    save_pruned,
    structure_summary,
    zero_hidden_channels,
)
from hf_prune.flops import encoder_flops
from hf_prune.structure import CONFIG_ATTR, original_layer_indices

TRANSFORMERS_4 = transformers.__version__.startswith("4.")


# ------------------------------------------------------------------------------------------------ helpers
def skipped_reference(model, arch, skip):
    """A copy whose layers `skip` return their input unchanged (the blocks are skipped, nothing else changes)."""
    reference = copy.deepcopy(model)

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else next(kwargs[k] for k in ("hidden_states", "x") if k in kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for i in skip:
        layers_of(reference, arch)[i].register_forward_hook(identity, with_kwargs=True)
    return reference


def layer_indices(model, arch):
    """The cache index every attention module of the model holds (None where it holds none)."""
    result = []
    for layer in layers_of(model, arch):
        indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        result.append(indices.pop() if len(indices) == 1 else (None if not indices else indices))
    return result


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("arch", ARCHS)
def test_removing_layers_equals_skipping_them(arch):
    model = build_deep_model(arch, num_layers=4)
    batch = make_batches(arch)[0]
    expected = logits(skipped_reference(model, arch, [0, 2]), batch)
    assert (expected - logits(model, batch)).abs().max() > 1e-3  # the layers mattered
    kept_weight = layers_of(model, arch)[3].state_dict()

    prune_layers(model, [0, 2])

    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    assert len(layers_of(model, arch)) == 2 and model.config.num_hidden_layers == 2
    assert original_layer_indices(model) == [1, 3]
    for name, value in layers_of(model, arch)[1].state_dict().items():
        assert torch.equal(value, kept_weight[name]), name
    if arch != "distilbert":  # DistilBERT layers keep no cache index
        assert layer_indices(model, arch) == [0, 1]
    summary = structure_summary(model)
    assert summary["num_layers"] == 2 and summary["original_num_layers"] == 4 and summary["pruned_layers"] == [0, 2]
    assert summary["heads_per_layer"] == [HEADS[arch]] * 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_cache_after_removing_layers(arch, tmp_path):
    model = build_deep_model(arch, num_layers=4)
    reference = skipped_reference(model, arch, [0, 3])
    prune_layers(model, [0, 3])  # layer 0, whose cache generate reads the length from, is gone
    batch = make_batches(arch, batch_size=2)[0]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**batch, **kwargs)
    assert cached.shape == (2, 8 + 6)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kwargs))
    assert torch.equal(cached, reference.generate(**batch, use_cache=False, **kwargs))
    model.save_pretrained(str(tmp_path))
    assert torch.equal(cached, load_pruned(str(tmp_path)).generate(**batch, **kwargs))


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_only_reloads_with_plain_from_pretrained(arch, tmp_path):
    model = build_deep_model(arch, num_layers=3)
    batch = make_batches(arch)[0]
    prune_layers(model, [1])
    assert structure_summary(model)["loads_with_from_pretrained"]
    model.save_pretrained(str(tmp_path))
    record = json.loads((tmp_path / "config.json").read_text())[CONFIG_ATTR]
    assert record["format_version"] == 2
    assert record["pruned_layers"] == [1] and record["original_num_layers"] == 3 and record["num_layers"] == 2
    plain = type(model).from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(logits(plain, batch), logits(model, batch), atol=1e-6, rtol=0)
    loaded = load_pruned(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(model)


# ------------------------------------------------------------------------------------------------ numbering
def test_repeated_calls_compose_in_original_numbering():
    once, twice = build_deep_model("bert", 5), build_deep_model("bert", 5)
    prune_layers(once, [1, 2, 4])
    prune_layers(twice, [2])
    prune_layers(twice, [1, 2, 4])  # 2 is already gone: ignored; 4 is original layer 4, now at position 3
    assert original_layer_indices(twice) == [0, 3]
    assert structure_summary(twice)["pruned_layers"] == [1, 2, 4]
    assert once.state_dict().keys() == twice.state_dict().keys()
    for (name, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.equal(a, b), name
    layers = list(twice.bert.encoder.layer)
    prune_layers(twice, [2, 4])  # nothing new: a no-op
    assert list(twice.bert.encoder.layer) == layers


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_and_neurons_travel_with_their_layer_in_either_order(arch, tmp_path):
    """Head and neuron lists stay with their layer: the record keys them by ORIGINAL layer index, the model's
    `prune_heads` keys by position in the current layer list, and either order of calls gives the same model."""
    group = 2 if arch == "llama" else 1
    heads = {1: list(range(2 * group)), 3: list(range(HEADS[arch]))}  # layer 3 loses every head
    batch = make_batches(arch)[0]

    first = build_deep_model(arch, num_layers=4)
    expected = logits(skipped_reference(prune_heads(copy.deepcopy(first), heads), arch, [0, 2]), batch)
    prune_heads(first, heads)
    prune_ffn_neurons(first, {3: [0, 7]})
    prune_layers(first, [0, 2])

    second = build_deep_model(arch, num_layers=4)
    prune_layers(second, [0, 2])
    prune_heads(second, {0: heads[1], 1: heads[3]})  # positions: original layers 1 and 3 are now 0 and 1
    prune_ffn_neurons(second, {1: [0, 7]})

    for model in (first, second):
        assert structure_summary(model)["pruned_heads"] == {0: heads[1], 1: heads[3]}
        record = getattr(model.config, CONFIG_ATTR)
        assert record["pruned_heads"] == {"1": heads[1], "3": heads[3]}
        assert record["pruned_neurons"] == {"3": [0, 7]}
    assert structure_summary(first) == structure_summary(second)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    without_neurons = build_deep_model(arch, num_layers=4)
    prune_heads(without_neurons, heads)
    prune_layers(without_neurons, [0, 2])
    torch.testing.assert_close(logits(without_neurons, batch), expected, atol=1e-5, rtol=0)
    if arch in ("bert", "roberta", "distilbert", "gpt2"):
        # Transformers' own field follows the positions, as its from_pretrained reads it.
        assert {int(k): v for k, v in first.config.pruned_heads.items()} == {0: heads[1], 1: heads[3]}

    save_pruned(first, str(tmp_path))
    loaded = load_pruned(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(first, batch), atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(first)
    assert not structure_summary(first)["loads_with_from_pretrained"]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_depth_width_heads_and_neurons_together(arch, tmp_path):
    model = build_deep_model(arch, num_layers=4)
    batch = make_batches(arch)[0]
    channels = [2, 5, 11, 12, 13, 30]
    zero_hidden_channels(model, channels)
    expected = logits(skipped_reference(model, arch, [2]), batch)
    prune_hidden(model, channels, exact=True)
    prune_layers(model, [2])
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    prune_heads(model, {2: [0, 1]})  # original layer 3
    prune_ffn_neurons(model, {0: list(range(64))})
    save_pruned(model, str(tmp_path))
    loaded = load_pruned(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(model)
    assert getattr(loaded.config, CONFIG_ATTR)["pruned_heads"] == {"3": [0, 1]}


def test_encoder_flops_count_the_layers_left():
    model = build_deep_model("bert", num_layers=4)
    dense = encoder_flops(model, 16)
    prune_layers(model, [1, 3])
    assert encoder_flops(model, 16) * 2 == dense


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "layers, message",
    [([4], r"layers=\[4\] do not exist; the model has layers 0 to 3"),
     ([-1], r"layers=\[-1\] do not exist"),
     ([0, 1, 2, 3], "all 4 layers left .* at least one must stay")],
)
def test_invalid_layers_raise(layers, message):
    model = build_deep_model("gpt2", num_layers=4)
    with pytest.raises(ValueError, match=message):
        prune_layers(model, layers)
    assert len(model.transformer.h) == 4 and model.config.n_layer == 4


def test_removing_the_last_layers_left_raises_in_original_numbering():
    model = build_deep_model("llama", num_layers=3)
    prune_layers(model, [0, 2])
    with pytest.raises(ValueError, match=r"all 1 layers left \(of 3\)"):
        prune_layers(model, [1])
    with pytest.raises(ValueError, match="0 to 2"):
        prune_layers(model, [3])


@pytest.mark.skipif(not TRANSFORMERS_4, reason="Transformers 5 fixes the per-layer scale when the model is built")
def test_gpt2_scaled_by_layer_index_is_refused_under_transformers_4():
    config = build_deep_model("gpt2", num_layers=3).config
    config.scale_attn_by_inverse_layer_idx = True
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        prune_layers(model, [0])
    assert len(model.transformer.h) == 3


# ------------------------------------------------------------------------------------------------ ONNX
@pytest.mark.onnx
def test_depth_pruned_bert_exports_and_serves(tmp_path):
    pytest.importorskip("optimum.onnxruntime")
    from hf_prune import create_session, export_onnx

    model = build_deep_model("bert", num_layers=3)
    prune_layers(model, [1])
    prune_heads(model, {0: [2]})
    save_pruned(model, str(tmp_path / "model"))
    result = export_onnx(str(tmp_path / "model"), tmp_path / "onnx", optimize=None)
    assert result.max_abs_diff["fp32"] < 1e-4
    session = create_session(tmp_path / "onnx")
    batch = make_batches("bert", batch_size=2, length=11, labels=False)[0]
    batch["attention_mask"][1, 7:] = 0
    torch.testing.assert_close(session(**batch).logits, logits(model, batch), atol=1e-4, rtol=0)


def test_a_depth_only_model_gets_the_structure_on_its_card():
    from hf_prune import PruningConfig, sparsity_report
    from hf_prune.finalize import model_card_section, pruned_structure

    model = build_deep_model("bert")
    prune_layers(model, [0])
    structure = pruned_structure(model)
    assert structure is not None and structure["pruned_layers"] == [0]
    section = model_card_section(PruningConfig(target_sparsity=0.0), sparsity_report(model), structure)
    assert "1 of 4 layers were removed (original indices [0])" in section
