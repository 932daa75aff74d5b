"""Physical removal of heads and FFN neurons: outputs equal to the masked model, bookkeeping, save/reload, generate."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers

from conftest import (
    ARCHS,
    GROUP,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    build_model,
    down_projection,
    layers_of,
    logits,
    make_batches,
    output_projection,
    spread_weights,
)

from hf_prune.structure import (
    STRUCTURE_NAME,
    BiasOnly,
    load_pruned,
    prune_ffn_neurons,
    prune_heads,
    remove_empty_structures,
    save_pruned,
    save_structure,
    structure_summary,
)

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
# Partial removal in both layers (whole key/value groups for Llama: 6 query heads, 3 key/value heads).
SOME_HEADS = {
    "bert": {0: [0, 2], 1: [1]},
    "roberta": {0: [0, 2], 1: [1]},
    "distilbert": {0: [0, 2], 1: [1]},
    "gpt2": {0: [0, 2], 1: [1]},
    "llama": {0: [0, 1, 4, 5], 1: [2, 3]},
}
SOME_NEURONS = {0: [0, 5, 7, 63], 1: list(range(0, 64, 2))}


# ------------------------------------------------------------------------------------------------ reference helpers
def masked_reference(model, arch, heads=None, neurons=None):
    """A copy of the unpruned model in which the given heads/neurons contribute nothing (zeroed output columns)."""
    reference = copy.deepcopy(model)
    layers = layers_of(reference, arch)
    with torch.no_grad():
        for layer_idx, indices in (heads or {}).items():
            weight = output_projection(layers[layer_idx], arch)
            for h in indices:
                weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        for layer_idx, indices in (neurons or {}).items():
            down_projection(layers[layer_idx], arch)[:, list(indices)] = 0
    return reference


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def head_params_removed(arch, heads) -> int:
    """Parameters that removing `heads` (query-head indices) deletes."""
    hidden, count = HIDDEN[arch], sum(len(v) for v in heads.values())
    if arch == "llama":  # no biases; per group: GROUP query heads, one key head, one value head, GROUP o-columns
        groups = count // GROUP[arch]
        return groups * (2 * GROUP[arch] + 2) * HEAD_DIM * hidden
    return count * (4 * HEAD_DIM * hidden + 3 * HEAD_DIM)  # q, k, v rows + biases, output-projection columns


def neuron_params_removed(arch, neurons) -> int:
    hidden, count = HIDDEN[arch], sum(len(v) for v in neurons.values())
    if arch == "llama":  # gate row, up row, down column, no biases
        return count * 3 * hidden
    return count * (2 * hidden + 1)


def all_heads_of_layer0(arch):
    return {0: list(range(HEADS[arch])), 1: SOME_HEADS[arch][1]}


def check_bookkeeping(model, arch, heads_left):
    """Every count and size the forward reads agrees with the weights."""
    layers = layers_of(model, arch)
    for layer, n in zip(layers, heads_left):
        width = n * HEAD_DIM
        if arch in ("bert", "roberta"):
            core = layer.attention.self
            assert core.num_attention_heads == n and core.all_head_size == width
            assert core.attention_head_size == HEAD_DIM
            if n:
                assert core.query.out_features == core.key.out_features == core.value.out_features == width
                assert core.query.weight.shape[0] == width and layer.attention.output.dense.weight.shape[1] == width
            assert len(getattr(layer.attention, "pruned_heads", ())) == HEADS[arch] - n
        elif arch == "distilbert":
            att = layer.attention
            assert att.n_heads == n and att.dim == width and att.attention_head_size == HEAD_DIM
            if n:
                assert att.q_lin.weight.shape[0] == att.k_lin.weight.shape[0] == att.v_lin.weight.shape[0] == width
                assert att.out_lin.weight.shape[1] == width
            assert len(getattr(att, "pruned_heads", ())) == HEADS[arch] - n
        elif arch == "gpt2":
            att = layer.attn
            assert att.num_heads == n and att.split_size == width and att.head_dim == HEAD_DIM
            if n:
                assert att.c_attn.weight.shape == (32, 3 * width) and att.c_attn.nf == 3 * width
                assert att.c_proj.weight.shape == (width, 32) and att.c_proj.nx == width
            assert len(getattr(att, "pruned_heads", ())) == HEADS[arch] - n
        else:
            att = layer.self_attn
            assert att.head_dim == HEAD_DIM and att.num_key_value_groups == GROUP[arch]
            if n:
                assert att.q_proj.out_features == att.q_proj.weight.shape[0] == width
                assert att.k_proj.weight.shape[0] == att.v_proj.weight.shape[0] == width // GROUP[arch]
                assert att.o_proj.in_features == att.o_proj.weight.shape[1] == width
            assert len(getattr(att, "pruned_heads", ())) == HEADS[arch] - n


def expected_config_pruned_heads(arch, heads):
    """What `config.pruned_heads` holds afterwards (never set for Llama, whose 4.x from_pretrained it would break)."""
    if arch != "llama":
        return {k: sorted(v) for k, v in heads.items()}
    return None


# ------------------------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_heads_matches_masked_reference(arch):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    heads = SOME_HEADS[arch]
    reference = masked_reference(model, arch, heads)
    dense = logits(model, batch)
    before = n_params(model)

    assert prune_heads(model, heads) is model

    expected = logits(reference, batch)
    assert not torch.allclose(dense, expected, atol=1e-2)  # the removed heads mattered
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    assert before - n_params(model) == head_params_removed(arch, heads)
    heads_left = [HEADS[arch] - len(heads[i]) for i in range(2)]
    check_bookkeeping(model, arch, heads_left)
    summary = structure_summary(model)
    assert summary["heads_per_layer"] == heads_left
    assert summary["pruned_heads"] == {k: sorted(v) for k, v in heads.items()}
    assert summary["key_value_heads_per_layer"] == [n // GROUP[arch] for n in heads_left]
    assert summary["parameters"] == n_params(model)
    recorded = expected_config_pruned_heads(arch, heads)
    if recorded is not None:
        assert {int(k): sorted(v) for k, v in model.config.pruned_heads.items()} == recorded
    else:
        assert not getattr(model.config, "pruned_heads", None)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_without_heads_runs_and_matches(arch):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    heads = all_heads_of_layer0(arch)
    reference = masked_reference(model, arch, heads)
    before = n_params(model)

    prune_heads(model, heads)

    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    assert before - n_params(model) == head_params_removed(arch, heads)
    check_bookkeeping(model, arch, [0, HEADS[arch] - len(heads[1])])
    assert structure_summary(model)["heads_per_layer"][0] == 0
    # Still trainable: the output-projection bias left of the empty layer receives a gradient.
    model.train()
    model(**dict(batch, labels=batch.get("labels", batch["input_ids"]))).loss.backward()
    kept_biases = [m.bias for m in model.modules() if isinstance(m, BiasOnly) and m.bias is not None]
    assert len(kept_biases) == (0 if arch == "llama" else 1)
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in kept_biases)


@pytest.mark.parametrize("arch", ARCHS)
def test_repeated_calls_compose_in_original_numbering(arch):
    batch = make_batches(arch)[0]
    group = GROUP[arch]
    first = {0: list(range(0, group))}  # head 0 (its group under GQA)
    second = {0: list(range(2 * group, 3 * group)) + list(range(0, group)), 1: list(range(group, 2 * group))}
    stepwise = build_model(arch)
    prune_heads(stepwise, first)
    prune_heads(stepwise, second)  # head 0 again: already gone, ignored
    size = n_params(stepwise)
    prune_heads(stepwise, first)  # a no-op
    assert n_params(stepwise) == size

    union = {0: sorted(set(first[0]) | set(second[0])), 1: second[1]}
    at_once = build_model(arch)
    reference = masked_reference(at_once, arch, union)
    prune_heads(at_once, union)
    torch.testing.assert_close(logits(stepwise, batch), logits(at_once, batch), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(stepwise, batch), logits(reference, batch), atol=1e-5, rtol=0)
    assert structure_summary(stepwise)["pruned_heads"] == union
    recorded = expected_config_pruned_heads(arch, union)
    if recorded is not None:
        assert {int(k): sorted(v) for k, v in stepwise.config.pruned_heads.items()} == recorded


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_the_rest_of_a_partly_pruned_layer(arch):
    """A layer emptied over two calls (the second Transformers' own prune_heads would turn into a crash)."""
    model = build_model(arch)
    batch = make_batches(arch)[0]
    group = GROUP[arch]
    prune_heads(model, {1: list(range(group))})
    prune_heads(model, {1: list(range(HEADS[arch]))})
    reference = masked_reference(build_model(arch), arch, {1: list(range(HEADS[arch]))})
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    check_bookkeeping(model, arch, [HEADS[arch], 0])
    recorded = expected_config_pruned_heads(arch, {1: list(range(HEADS[arch]))})
    if recorded is not None:
        assert {int(k): v for k, v in model.config.pruned_heads.items()} == recorded


def test_gqa_partial_group_raises():
    model = build_model("llama")
    before = n_params(model)
    with pytest.raises(ValueError, match=r"layer 1 .*group 1 .*query heads \[2, 3\]"):
        prune_heads(model, {1: [2]})
    assert n_params(model) == before
    prune_heads(model, {1: [2, 3]})  # the whole group is fine
    assert structure_summary(model)["key_value_heads_per_layer"] == [3, 2]


@pytest.mark.parametrize(
    "heads, message", [({2: [0]}, "layer 2"), ({0: [4]}, r"cannot prune \[4\]"), ({-1: [0]}, "layer -1")]
)
def test_invalid_heads_raise(heads, message):
    model = build_model("bert")
    with pytest.raises(ValueError, match=message):
        prune_heads(model, heads)


def test_keeps_dtype_and_requires_grad():
    model = build_model("bert").to(torch.bfloat16)
    model.bert.encoder.layer[1].attention.self.query.weight.requires_grad_(False)
    prune_heads(model, {0: [1], 1: [0]})
    prune_ffn_neurons(model, {0: [3]})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.bert.encoder.layer[1].attention.self.query.weight.requires_grad
    assert model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    logits(model, make_batches("bert")[0])


# ------------------------------------------------------------------------------------------------ neurons
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_ffn_neurons_matches_masked_reference(arch):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    reference = masked_reference(model, arch, neurons=SOME_NEURONS)
    dense = logits(model, batch)
    before = n_params(model)

    assert prune_ffn_neurons(model, SOME_NEURONS) is model

    assert not torch.allclose(dense, logits(reference, batch), atol=1e-2)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    assert before - n_params(model) == neuron_params_removed(arch, SOME_NEURONS)
    sizes = [INTERMEDIATE[arch] - len(SOME_NEURONS[i]) for i in range(2)]
    summary = structure_summary(model)
    assert summary["intermediate_sizes"] == sizes
    assert summary["intermediate_size"] == INTERMEDIATE[arch]
    for layer, size in zip(layers_of(model, arch), sizes):
        assert down_projection(layer, arch).shape[1] == size
    if arch == "llama":
        mlp = layers_of(model, arch)[1].mlp
        assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.weight.shape[0] == mlp.intermediate_size == sizes[1]
    # Original numbering composes: neuron 1 is still neuron 1 after neuron 0 went.
    prune_ffn_neurons(model, {0: [0, 1]})
    assert structure_summary(model)["pruned_neurons"][0] == [0, 1, 5, 7, 63]


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_without_neurons(arch):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    neurons = {1: list(range(INTERMEDIATE[arch]))}
    reference = masked_reference(model, arch, neurons=neurons)
    before = n_params(model)
    prune_ffn_neurons(model, neurons)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    assert before - n_params(model) == neuron_params_removed(arch, neurons)
    assert structure_summary(model)["intermediate_sizes"] == [INTERMEDIATE[arch], 0]


def test_invalid_neurons_raise():
    with pytest.raises(ValueError, match="neurons 0 to 63"):
        prune_ffn_neurons(build_model("gpt2"), {0: [64]})


# ------------------------------------------------------------------------------------------------ empty structures
def zero_structures(model, arch):
    """Zero one head's output columns and another head's value rows, some neurons' down columns and one neuron's input.

    Returns what remove_empty_structures must find, in original numbering.
    """
    layers = layers_of(model, arch)
    group = GROUP[arch]
    out_head = 1 * group  # under GQA a whole group: heads 2, 3
    value_unit = 2  # value head (MHA) / key-value group (GQA) 2
    with torch.no_grad():
        weight = output_projection(layers[0], arch)
        weight[:, out_head * HEAD_DIM : (out_head + group) * HEAD_DIM] = 0
        layer = layers[1]
        rows = slice(value_unit * HEAD_DIM, (value_unit + 1) * HEAD_DIM)
        if arch == "gpt2":
            offset = 2 * HIDDEN[arch]
            rows = slice(offset + rows.start, offset + rows.stop)
            layer.attn.c_attn.weight[:, rows] = 0
            layer.attn.c_attn.bias[rows] = 0
        else:
            value = {"llama": lambda l: l.self_attn.v_proj, "distilbert": lambda l: l.attention.v_lin}.get(
                arch, lambda l: l.attention.self.value
            )(layer)
            value.weight[rows] = 0
            if value.bias is not None:
                value.bias[rows] = 0
        down_projection(layers[1], arch)[:, [3, 7]] = 0
        if arch == "gpt2":
            layers[0].mlp.c_fc.weight[:, 10] = 0
            layers[0].mlp.c_fc.bias[10] = 0
        else:
            up = {
                "llama": lambda l: l.mlp.up_proj,
                "distilbert": lambda l: l.ffn.lin1,
            }.get(arch, lambda l: l.intermediate.dense)(layers[0])
            up.weight[10] = 0
            if up.bias is not None:
                up.bias[10] = 0
    heads = {0: list(range(out_head, out_head + group)), 1: list(range(value_unit * group, (value_unit + 1) * group))}
    return {"heads": heads, "neurons": {0: [10], 1: [3, 7]}}


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_empty_structures_finds_exactly_the_zeroed_units(arch):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    expected = zero_structures(model, arch)
    before_logits = logits(model, batch)
    before = n_params(model)

    removed = remove_empty_structures(model)

    assert removed == expected
    torch.testing.assert_close(logits(model, batch), before_logits, atol=1e-5, rtol=0)
    assert before - n_params(model) == head_params_removed(arch, expected["heads"]) + neuron_params_removed(
        arch, expected["neurons"]
    )
    assert remove_empty_structures(model) == {"heads": {}, "neurons": {}}


def test_remove_empty_structures_can_empty_a_layer():
    model = build_model("bert")
    batch = make_batches("bert")[0]
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight.zero_()
    before_logits = logits(model, batch)
    assert remove_empty_structures(model)["heads"] == {0: [0, 1, 2, 3]}
    torch.testing.assert_close(logits(model, batch), before_logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ save / reload
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_pruned_round_trip(arch, tmp_path):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    prune_heads(model, all_heads_of_layer0(arch))
    prune_ffn_neurons(model, SOME_NEURONS)
    expected = logits(model, batch)

    save_pruned(model, str(tmp_path))
    assert (tmp_path / STRUCTURE_NAME).is_file()
    loaded = load_pruned(str(tmp_path))

    assert type(loaded) is type(model) and not loaded.training
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # The reloaded model can be pruned further in the same (original) numbering.
    prune_heads(loaded, {1: list(range(HEADS[arch]))})
    assert structure_summary(loaded)["heads_per_layer"] == [0, 0]
    assert not structure_summary(model)["loads_with_from_pretrained"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_after_pruning(arch, tmp_path):
    model = build_model(arch)
    heads = all_heads_of_layer0(arch)  # layer 0, whose cache generate reads its length from, has no heads
    reference = masked_reference(model, arch, heads, SOME_NEURONS)
    prune_heads(model, heads)
    prune_ffn_neurons(model, SOME_NEURONS)
    batch = make_batches(arch, batch_size=2)[0]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**batch, **kwargs)
    assert cached.shape == (2, 8 + 6)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kwargs))
    assert torch.equal(cached, reference.generate(**batch, **kwargs))
    save_pruned(model, str(tmp_path))
    assert torch.equal(cached, load_pruned(str(tmp_path)).generate(**batch, **kwargs))


@pytest.mark.skipif(not TRANSFORMERS_4, reason="only Transformers 4.x rebuilds shapes from config.pruned_heads")
@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "gpt2"])
def test_plain_from_pretrained_reloads_head_pruning_in_4x(arch, tmp_path):
    model = build_model(arch)
    batch = make_batches(arch)[0]
    prune_heads(model, SOME_HEADS[arch])
    assert structure_summary(model)["loads_with_from_pretrained"]
    model.save_pretrained(str(tmp_path))
    loaded = type(model).from_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    assert structure_summary(loaded) == structure_summary(model)


def test_loads_with_from_pretrained_flag():
    model = build_model("bert")
    prune_heads(model, {0: [1]})
    assert structure_summary(model)["loads_with_from_pretrained"] == TRANSFORMERS_4
    prune_heads(model, {1: [0, 1, 2, 3]})  # a layer without heads: Transformers cannot rebuild it
    assert not structure_summary(model)["loads_with_from_pretrained"]
    llama = build_model("llama")
    prune_heads(llama, {0: [0, 1]})
    assert not structure_summary(llama)["loads_with_from_pretrained"]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_load_pruned_reads_a_4x_checkpoint_without_structure_file(arch, tmp_path):
    """A checkpoint described by config.pruned_heads only (what 4.x writes) loads under 4.x and 5.x alike."""
    model = build_model(arch)
    batch = make_batches(arch)[0]
    heads = SOME_HEADS[arch]
    prune_heads(model, heads)
    model.save_pretrained(str(tmp_path))  # no structure file: config.pruned_heads is all there is
    config = json.loads((tmp_path / "config.json").read_text())
    # 4.x writes this; hf_prune writes it under 5.x too for the model types 4.x rebuilds from it.
    assert config["pruned_heads"] == {str(k): sorted(v) for k, v in heads.items()}
    assert not (tmp_path / STRUCTURE_NAME).exists()

    loaded = load_pruned(str(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)
    assert structure_summary(loaded)["pruned_heads"] == {k: sorted(v) for k, v in heads.items()}
    # Saved again, the config still says which heads are gone, in integer keys.
    assert {int(k): v for k, v in loaded.config.pruned_heads.items()} == {k: sorted(v) for k, v in heads.items()}


def test_load_pruned_rejects_weights_that_do_not_fit(tmp_path):
    model = build_model("bert")
    prune_heads(model, {0: [1]})
    save_pruned(model, str(tmp_path))
    structure = json.loads((tmp_path / STRUCTURE_NAME).read_text())
    structure.pop("heads_per_layer")
    structure["pruned_heads"] = {"0": [1, 2]}
    (tmp_path / STRUCTURE_NAME).write_text(json.dumps(structure))
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("hf_prune_structure")  # the record in config.json would contradict the edited file first
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit.*shape mismatches"):
        load_pruned(str(tmp_path))


def test_load_pruned_rejects_unknown_arguments(tmp_path):
    model = build_model("bert")
    save_pruned(model, str(tmp_path))
    with pytest.raises(TypeError, match="device_map"):
        load_pruned(str(tmp_path), device_map="auto")
    loaded = load_pruned(str(tmp_path), model_class=transformers.AutoModelForSequenceClassification)
    assert type(loaded) is transformers.BertForSequenceClassification
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_save_structure_json_content(tmp_path):
    model = build_model("llama")
    prune_heads(model, {1: [0, 1]})
    prune_ffn_neurons(model, {0: [5]})
    path = save_structure(model, str(tmp_path))
    assert os.path.basename(path) == STRUCTURE_NAME
    data = json.loads(open(path).read())
    assert data["format_version"] == 1
    assert data["architecture"] == "llama"
    assert data["pruned_heads"] == {"1": [0, 1]}
    assert data["heads_per_layer"] == [6, 4]
    assert data["key_value_heads_per_layer"] == [3, 2]
    assert data["pruned_neurons"] == {"0": [5]}
    assert data["intermediate_sizes"] == [63, 64]
    assert data["parameters"] == n_params(model)


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_other_llama_style_models(name, tmp_path):
    """Mistral and Qwen2 (biases on q/k/v) share the Llama layout: removal, generate and reload work the same way."""
    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[name]
    torch.manual_seed(0)
    config = config_class(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = spread_weights(model_class(config)).eval()
    heads, neurons = {0: list(range(6)), 1: [2, 3]}, {1: list(range(10))}
    reference = masked_reference(model, "llama", heads, neurons)
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    batch = make_batches("llama")[0]
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**batch, **kwargs), reference.generate(**batch, **kwargs))
    save_pruned(model, str(tmp_path))
    torch.testing.assert_close(logits(load_pruned(str(tmp_path)), batch), logits(model, batch), atol=1e-6, rtol=0)


def test_load_pruned_reads_sharded_checkpoints(tmp_path):
    model = build_model("gpt2")
    prune_heads(model, {0: [1]})
    prune_ffn_neurons(model, {1: [0, 1, 2]})
    save_pruned(model, str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    batch = make_batches("gpt2")[0]
    torch.testing.assert_close(logits(load_pruned(str(tmp_path)), batch), logits(model, batch), atol=1e-6, rtol=0)
