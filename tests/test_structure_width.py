"""Width pruning: hidden channels removed from embeddings, every projection and every norm; exact with exact-statistics
norms when the channels were zero, plain norms otherwise; bookkeeping, records, reload, composition, generate, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from torch import nn

from conftest import ARCHS, HEADS, HIDDEN, build_model, layers_of, logits, make_batches

from hf_prune import (
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    prune_hidden,
    save_pruned,
    structure_summary,
    zero_hidden_channels,
)
from hf_prune.flops import encoder_flops
from hf_prune.structure import CONFIG_ATTR, STRUCTURE_NAME, ExactLayerNorm, ExactRMSNorm

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
# Six channels: Llama's 48 -> 42 stays a multiple of its 6 heads, which Transformers 5's LlamaConfig requires.
CHANNELS = {arch: [0, 3, 7, 8, 20, HIDDEN[arch] - 1] for arch in ARCHS}
# Parameters whose size stays the ORIGINAL hidden size: the spaces of their own behind a pooler / pre-classifier.
HEAD_SPACE = {
    "bert": {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"},
    "roberta": {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight"},
    "distilbert": {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight"},
    "gpt2": set(),
    "llama": set(),
}
# Of those, the adapters read the residual stream: their input side shrinks.
ADAPTERS = {"bert": {"bert.pooler.dense.weight"}, "roberta": {"classifier.dense.weight"},
            "distilbert": {"pre_classifier.weight"}, "gpt2": set(), "llama": set()}


# ------------------------------------------------------------------------------------------------ helpers
def writers(model, arch):
    """The attention-output and FFN-down projections of every layer (what writes the residual stream)."""
    for layer in layers_of(model, arch):
        if arch == "gpt2":
            yield from (layer.attn.c_proj, layer.mlp.c_proj)
        elif arch == "llama":
            yield from (layer.self_attn.o_proj, layer.mlp.down_proj)
        elif arch == "distilbert":
            yield from (layer.attention.out_lin, layer.ffn.lin2)
        else:
            yield from (layer.attention.output.dense, layer.output.dense)


def zeroed_reference(model, arch, channels):
    """A copy in which `channels` are zero throughout the residual stream, written independently of hf_prune: every
    embedding column, every norm weight/bias and every writer row/bias of those channels set to 0."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.Embedding):
                module.weight[:, channels] = 0
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                module.weight[channels] = 0
                if getattr(module, "bias", None) is not None:
                    module.bias[channels] = 0
        for module in writers(reference, arch):
            if type(module).__name__ == "Conv1D":
                module.weight[:, channels] = 0
            else:
                module.weight[channels, :] = 0
            if module.bias is not None:
                module.bias[channels] = 0
    return reference


def sizes_with(model, size):
    return {name for name, p in model.named_parameters() if size in p.shape}


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("arch", ARCHS)
def test_removing_zeroed_channels_is_exact_with_exact_norms(arch):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    channels, hidden = CHANNELS[arch], HIDDEN[arch]
    reference = zeroed_reference(model, arch, channels)
    expected = logits(reference, batch)
    assert (expected - logits(model, batch)).abs().max() > 1e-3  # the channels mattered before they were zeroed

    zero_hidden_channels(model, channels)  # hf_prune's own zeroing: the same model as the independent reference
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    prune_hidden(model, channels, exact=True)

    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    new = hidden - len(channels)
    assert model.config.hidden_size == new
    norms = [m for m in model.modules() if isinstance(m, (ExactLayerNorm, ExactRMSNorm))]
    assert norms and all(m.elements == hidden and m.weight.shape == (new,) for m in norms)
    summary = structure_summary(model)
    assert summary["hidden_size"] == new and summary["original_hidden_size"] == hidden
    assert summary["pruned_hidden"] == channels and summary["norm_elements"] == hidden
    assert summary["head_dim"] == 8 and summary["heads_per_layer"] == [HEADS[arch]] * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_of_the_hidden_size_shrinks(arch):
    """After width pruning nothing has the original hidden size but the pooled / pre-classifier spaces (one head
    group is removed first, so that the attention width, heads x head_dim, differs from the hidden size)."""
    model = build_model(arch)
    hidden = HIDDEN[arch]
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    before = sizes_with(model, hidden)
    assert before > HEAD_SPACE[arch]
    prune_hidden(model, CHANNELS[arch])
    assert sizes_with(model, hidden) == HEAD_SPACE[arch]
    assert sizes_with(model, hidden - len(CHANNELS[arch])) == (before - HEAD_SPACE[arch]) | ADAPTERS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_norms_are_not_exact_but_run_and_reload(arch, tmp_path):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    channels = CHANNELS[arch]
    expected = logits(zeroed_reference(model, arch, channels), batch)
    zero_hidden_channels(model, channels)
    norm_types = {type(m) for m in model.modules() if isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__}
    prune_hidden(model, channels)  # exact=False: the model's own norms, at the new width

    out = logits(model, batch)
    assert torch.isfinite(out).all()
    # The norms average over fewer channels now: that is the trade-off exact=True avoids.
    assert (out - expected).abs().max() > 1e-4
    assert not any(isinstance(m, (ExactLayerNorm, ExactRMSNorm)) for m in model.modules())
    assert {type(m) for m in model.modules() if isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__} == norm_types
    assert structure_summary(model)["norm_elements"] is None

    model.save_pretrained(str(tmp_path))  # plain save: the record travels in config.json
    loaded = load_pruned(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), out, atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(model)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_round_trip_and_record(arch, tmp_path):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    zero_hidden_channels(model, CHANNELS[arch])
    prune_hidden(model, CHANNELS[arch], exact=True)
    save_pruned(model, str(tmp_path))

    record = json.loads((tmp_path / "config.json").read_text())[CONFIG_ATTR]
    assert record["format_version"] == 2
    assert record["pruned_hidden"] == CHANNELS[arch]
    assert record["original_hidden_size"] == HIDDEN[arch] and record["norm_elements"] == HIDDEN[arch]
    assert json.loads((tmp_path / STRUCTURE_NAME).read_text())["pruned_hidden"] == CHANNELS[arch]
    if arch == "llama":  # hidden_size // num_attention_heads is no longer the head size
        assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 8

    loaded = load_pruned(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(model)
    assert not structure_summary(loaded)["loads_with_from_pretrained"]


def test_heads_only_record_stays_format_1():
    """A record without layers or hidden channels is written in format 1, which older hf_prune versions read."""
    model = build_model("bert")
    prune_heads(model, {0: [1]})
    assert getattr(model.config, CONFIG_ATTR)["format_version"] == 1
    prune_hidden(model, [2])
    assert getattr(model.config, CONFIG_ATTR)["format_version"] == 2


# ------------------------------------------------------------------------------------------------ numbering, modes
def test_repeated_calls_compose_in_original_numbering():
    once, twice = build_model("bert"), build_model("bert")
    prune_hidden(once, [1, 2, 3, 10])
    prune_hidden(twice, [2, 10])
    prune_hidden(twice, [1, 2, 3])  # 2 is already gone: ignored
    assert structure_summary(twice)["pruned_hidden"] == [1, 2, 3, 10]
    for (name, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.equal(a, b), name
    weight = twice.bert.embeddings.word_embeddings.weight
    prune_hidden(twice, [3, 10])  # nothing new: a no-op
    assert twice.bert.embeddings.word_embeddings.weight is weight


def test_exact_norms_follow_the_statistics_the_model_has_now(tmp_path):
    """exact=True keeps the element count the norms average over at the time of the call: after a plain (inexact)
    removal that is the reduced width, and the reload restores it."""
    model = build_model("gpt2")
    batch = make_batches("gpt2")[0]
    prune_hidden(model, [0, 1])  # plain: norms over 30 channels from now on
    zero_hidden_channels(model, [5, 6])
    expected = logits(model, batch)
    prune_hidden(model, [5, 6], exact=True)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    assert structure_summary(model)["norm_elements"] == 30
    model.save_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(load_pruned(str(tmp_path)), batch), expected, atol=1e-5, rtol=0)
    # Pruning again with exact=False puts plain LayerNorms back.
    prune_hidden(model, [9])
    assert not any(isinstance(m, ExactLayerNorm) for m in model.modules())
    assert model.transformer.ln_f.normalized_shape == (27,) and isinstance(model.transformer.ln_f, nn.LayerNorm)


def test_tied_lm_head_stays_tied(tmp_path):
    model = build_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    prune_hidden(model, [4, 5])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (100, 30)
    save_pruned(model, str(tmp_path))
    loaded = load_pruned(str(tmp_path))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_dtype_and_requires_grad_are_kept():
    model = build_model("llama").to(torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(False)
    prune_hidden(model, list(range(6)), exact=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.lm_head.weight.requires_grad


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_after_width_pruning(arch):
    model = build_model(arch)
    reference = zeroed_reference(model, arch, CHANNELS[arch])
    zero_hidden_channels(model, CHANNELS[arch])
    prune_hidden(model, CHANNELS[arch], exact=True)
    batch = make_batches(arch, batch_size=2)[0]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**batch, **kwargs)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kwargs))
    assert torch.equal(cached, reference.generate(**batch, **kwargs))


# ------------------------------------------------------------------------------------------------ composition
@pytest.mark.parametrize("arch", ARCHS)
def test_composition_with_heads_and_neurons_in_either_order(arch, tmp_path):
    # Layer 0 loses every head and layer 1 every FFN neuron: the bias-only stand-ins lose hidden channels too.
    heads = {0: list(range(HEADS[arch])), 1: [0, 1]}
    neurons = {0: [1, 5, 9], 1: list(range(64))}
    channels = CHANNELS[arch]
    batch = make_batches(arch)[0]

    first = zero_hidden_channels(build_model(arch), channels)
    expected = logits(prune_ffn_neurons(prune_heads(copy.deepcopy(first), heads), neurons), batch)
    prune_hidden(first, channels, exact=True)
    prune_heads(first, heads)
    prune_ffn_neurons(first, neurons)

    second = zero_hidden_channels(build_model(arch), channels)
    prune_heads(second, heads)
    prune_ffn_neurons(second, neurons)
    prune_hidden(second, channels, exact=True)

    for model in (first, second):
        torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    assert structure_summary(first) == structure_summary(second)
    assert structure_summary(first)["heads_per_layer"] == [0, HEADS[arch] - 2]
    assert structure_summary(first)["intermediate_sizes"] == [61, 0]
    save_pruned(first, str(tmp_path))
    loaded = load_pruned(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(first, batch), atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(first)


def test_encoder_flops_follow_the_hidden_size():
    model = build_model("bert")
    seq = 16

    def expected(hidden, layers=2, heads=4, head_dim=8, inter=64):
        width = heads * head_dim
        per_token = 2 * (3 * hidden * width + width * hidden) + 2 * 2 * hidden * inter
        return layers * (per_token * seq + 2 * 2 * seq * seq * width)

    assert encoder_flops(model, seq) == expected(32)
    prune_hidden(model, list(range(8)))
    assert encoder_flops(model, seq) == expected(24)  # head_dim stays 8 although hidden // heads is now 6


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "channels, message",
    [([32], r"channels=\[32\] do not exist; hidden channels are 0 to 31"),
     ([-1, 3], r"channels=\[-1\] do not exist"),
     (range(32), "all 32 hidden channels left .* at least one must stay")],
)
def test_invalid_channels_raise(channels, message):
    model = build_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune_hidden(model, channels)
    assert model.config.hidden_size == 32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_heads_and_models_raise():
    torch.manual_seed(0)
    masked_lm = transformers.BertForMaskedLM(build_model("bert").config)
    with pytest.raises(ValueError, match=r"cls\.predictions\.transform"):
        prune_hidden(masked_lm, [0])
    assert masked_lm.config.hidden_size == 32
    model = build_model("bert")
    torch.nn.utils.prune.l1_unstructured(model.bert.encoder.layer[0].intermediate.dense, "weight", amount=0.5)
    with pytest.raises(ValueError, match="make_permanent"):
        prune_hidden(model, [0])


@pytest.mark.skipif(TRANSFORMERS_4, reason="Transformers 5 validates LlamaConfig.hidden_size against the heads")
def test_llama_hidden_size_must_stay_a_multiple_of_the_heads_under_transformers_5():
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"hidden_size=44.*multiple of the number of attention heads"):
        prune_hidden(model, [0, 1, 2, 3])
    assert model.config.hidden_size == 48 and model.model.embed_tokens.weight.shape == (100, 48)


# ------------------------------------------------------------------------------------------------ ONNX
@pytest.mark.onnx
@pytest.mark.parametrize("exact", [False, True])
def test_width_pruned_bert_exports_and_serves(exact, tmp_path):
    pytest.importorskip("optimum.onnxruntime")
    from hf_prune import create_session, export_onnx

    model = build_model("bert")
    prune_heads(model, {1: [0]})
    zero_hidden_channels(model, CHANNELS["bert"])
    prune_hidden(model, CHANNELS["bert"], exact=exact)
    save_pruned(model, str(tmp_path / "model"))
    result = export_onnx(str(tmp_path / "model"), tmp_path / "onnx", optimize=None)
    assert result.max_abs_diff["fp32"] < 1e-4
    session = create_session(tmp_path / "onnx")
    batch = make_batches("bert", batch_size=2, length=11, labels=False)[0]
    batch["attention_mask"][1, 7:] = 0
    torch.testing.assert_close(session(**batch).logits, logits(model, batch), atol=1e-4, rtol=0)


@pytest.mark.onnx
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_width_pruned_decoders_export_without_the_cache(arch, tmp_path):
    # Optimum sizes the cache inputs as hidden_size / num_attention_heads, which width pruning breaks: the export
    # drops the cache and says so, and the graph still matches PyTorch.
    pytest.importorskip("optimum.onnxruntime")
    from hf_prune import export_onnx

    model = build_model(arch)
    prune_hidden(model, CHANNELS[arch])
    save_pruned(model, str(tmp_path / "model"))
    result = export_onnx(str(tmp_path / "model"), tmp_path / "onnx", optimize=None)
    assert not result.task.endswith("-with-past")
    assert any("hidden channels were removed" in note for note in result.notes)
    assert result.max_abs_diff["fp32"] < 1e-4
