"""Every registered family, on tiny random models built from configs: heads (whole key/value groups where grouped, and
one attention block emptied) and FFN neurons removed after their output columns were zeroed give the same outputs,
and the model saved with plain `save_pretrained` reloads with `load_pruned` to the same outputs.

A family is tested on each Transformers major that has it; what a family cannot do is asserted as a clear error.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import spread_weights

import hf_prune
from hf_prune.linear import is_conv1d
from hf_prune.structure import attention_sites, find_layers, neuron_slots, structure_summary
from hf_prune.structure.layout import group_size_of, head_dim_of, kept_heads_of
from hf_prune.structure.paths import find_module, get_module

MAJOR = int(transformers.__version__.split(".")[0])
TEXT = dict(vocab_size=99, pad_token_id=0, max_position_embeddings=64)
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **TEXT)
DECODER = dict(ENCODER, num_key_value_heads=2)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=99, pad_token_id=1, max_position_embeddings=64,
               decoder_start_token_id=2)
T5 = dict(d_model=32, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=99,
          pad_token_id=0, decoder_start_token_id=0)

# family -> (config class name, config kwargs, model class name, input kind)
FAMILIES = {
    "bert": ("BertConfig", ENCODER, "BertForSequenceClassification", "text"),
    "roberta": ("RobertaConfig", dict(ENCODER, pad_token_id=1, max_position_embeddings=72),
                "RobertaForSequenceClassification", "text"),
    "xlm-roberta": ("XLMRobertaConfig", dict(ENCODER, pad_token_id=1, max_position_embeddings=72),
                    "XLMRobertaForSequenceClassification", "text"),
    "electra": ("ElectraConfig", dict(ENCODER, embedding_size=16), "ElectraForSequenceClassification", "text"),
    "deberta-v2": ("DebertaV2Config", dict(ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                           position_buckets=8, share_att_key=False),
                   "DebertaV2ForSequenceClassification", "text"),
    "deberta-v3": ("DebertaV2Config", dict(ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                           position_buckets=8, share_att_key=True, norm_rel_ebd="layer_norm"),
                   "DebertaV2ForSequenceClassification", "text"),
    "modernbert": ("ModernBertConfig", dict(ENCODER, global_attn_every_n_layers=2, local_attention=8),
                   "ModernBertForSequenceClassification", "text"),
    "mpnet": ("MPNetConfig", dict(ENCODER, pad_token_id=1, max_position_embeddings=72),
              "MPNetForSequenceClassification", "text"),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **TEXT),
                   "DistilBertForSequenceClassification", "text"),
    "vit": ("ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              image_size=16, patch_size=8), "ViTForImageClassification", "image"),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_inner=37, vocab_size=99, n_positions=64),
             "GPT2LMHeadModel", "text"),
    "llama": ("LlamaConfig", DECODER, "LlamaForCausalLM", "text"),
    "mistral": ("MistralConfig", DECODER, "MistralForCausalLM", "text"),
    "qwen2": ("Qwen2Config", DECODER, "Qwen2ForCausalLM", "text"),
    "qwen3": ("Qwen3Config", dict(DECODER, head_dim=8), "Qwen3ForCausalLM", "text"),
    "gemma": ("GemmaConfig", dict(DECODER, head_dim=8), "GemmaForCausalLM", "text"),
    "gemma2": ("Gemma2Config", dict(DECODER, head_dim=8), "Gemma2ForCausalLM", "text"),
    "phi3": ("Phi3Config", DECODER, "Phi3ForCausalLM", "text"),
    "gpt_neox": ("GPTNeoXConfig", ENCODER, "GPTNeoXForCausalLM", "text"),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                                    new_decoder_architecture=True, vocab_size=99), "FalconForCausalLM", "text"),
    "falcon-mha": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
                                        vocab_size=99), "FalconForCausalLM", "text"),
    "opt": ("OPTConfig", dict(ENCODER, ffn_dim=37, word_embed_proj_dim=32), "OPTForCausalLM", "text"),
    # Sizes in multiples of 4 elements: the fused expert kernels of Transformers 5 want 16-byte strides.
    "mixtral": ("MixtralConfig", dict(DECODER, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
                "MixtralForCausalLM", "text"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                                         shared_expert_intermediate_size=16), "Qwen2MoeForCausalLM", "text"),
    "bart": ("BartConfig", SEQ2SEQ, "BartForConditionalGeneration", "seq2seq"),
    "t5": ("T5Config", T5, "T5ForConditionalGeneration", "seq2seq"),
    "t5-gated": ("T5Config", dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                 "T5ForConditionalGeneration", "seq2seq"),
    "whisper": ("WhisperConfig", dict(SEQ2SEQ, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                                      decoder_start_token_id=2, suppress_tokens=None, begin_suppress_tokens=None),
                "WhisperForConditionalGeneration", "speech"),
    "wav2vec2": ("Wav2Vec2Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                        num_feat_extract_layers=2, num_conv_pos_embeddings=16, vocab_size=20),
                 "Wav2Vec2ForCTC", "audio"),
}


def build(family: str, seed: int = 0):
    config_name, kwargs, model_name, _ = FAMILIES[family]
    if not hasattr(transformers, config_name) or not hasattr(transformers, model_name):
        pytest.skip(f"{family} is not in Transformers {transformers.__version__}")
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    return spread_weights(model).eval()


def inputs(family: str, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    kind = FAMILIES[family][3]
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    if kind == "audio":
        return {"input_values": torch.randn(2, 400, generator=generator)}
    ids = torch.randint(3, 99, (2, 7), generator=generator)
    if kind == "speech":
        return {"input_features": torch.randn(2, 16, 32, generator=generator), "decoder_input_ids": ids}
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq2seq":
        batch["decoder_input_ids"] = ids.flip(1)
    return batch


@torch.no_grad()
def outputs(model, batch) -> torch.Tensor:
    return model(**batch).logits.double()


def zero_columns(module, columns: list[int]) -> None:
    weight = module.weight
    with torch.no_grad():
        if is_conv1d(module):
            weight[columns, :] = 0
        else:
            weight[:, columns] = 0


def zero_expert_neurons(moe, layer, local: list[int]) -> list[int]:
    """Zero neurons `local` of every routed expert (and of the shared expert) of a MoE layer; their ORIGINAL ids."""
    experts = get_module(layer, moe.experts)
    with torch.no_grad():
        if isinstance(experts, torch.nn.ModuleList):
            size = get_module(experts[0], moe.expert_mlp.output).weight.shape[1]
            for expert in experts:
                get_module(expert, moe.expert_mlp.output).weight[:, local] = 0
        else:
            down = getattr(experts, moe.fused_down)
            size = down.shape[2]
            down[:, :, local] = 0
    count = get_module(layer, moe.router).weight.shape[0]
    ids = [e * size + n for e in range(count) for n in local]
    if moe.shared is not None and find_module(layer, moe.shared.output) is not None:
        zero_columns(get_module(layer, moe.shared.output), local)
        ids += [count * size + n for n in local]
    return ids


def plan(model) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """One key/value group per attention block (its heads' output columns zeroed), every head of the last block, and
    two FFN neurons per layer (their down-projection columns zeroed)."""
    heads: dict[int, list[int]] = {}
    sites = attention_sites(model)
    for site in sites:
        kept = kept_heads_of(site.spec, site.layer)
        group = group_size_of(site.spec, site.layer)
        if site.index == len(sites) - 1 and not site.spec.shared_position_bias:
            chosen = kept
        elif len(kept) > group:
            g = site.index % (len(kept) // group)
            chosen = kept[g * group:(g + 1) * group]
        else:
            continue
        head_dim = head_dim_of(site.spec, site.layer)
        columns = [c for h in chosen for c in range(h * head_dim, (h + 1) * head_dim)]
        zero_columns(get_module(site.layer, site.spec.output), columns)
        heads[site.index] = chosen
    neurons: dict[int, list[int]] = {}
    _, layers = find_layers(model)
    for i, layer in enumerate(layers):
        moe = layers.layout(i).moe
        if moe is not None:
            # Four per expert: Transformers 5 runs fused experts on 16-byte rows.
            neurons[i] = zero_expert_neurons(moe, layer, [1, 2, 3, 5 + i])
            continue
        mlp = layers.layout(i).mlp
        if mlp is None:
            continue
        chosen = [1, 5 + i]
        zero_columns(get_module(layer, mlp.output), chosen)
        neurons[i] = chosen
    return heads, neurons


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_removal_is_exact_and_the_saved_model_reloads(family, tmp_path):
    model = build(family)
    batch = inputs(family)
    heads, neurons = plan(model)
    expected = outputs(model, batch)
    params = sum(p.numel() for p in model.parameters())

    hf_prune.prune_heads(model, heads)
    if neurons:
        hf_prune.prune_ffn_neurons(model, neurons)
    assert sum(p.numel() for p in model.parameters()) < params
    torch.testing.assert_close(outputs(model, batch), expected, atol=1e-5, rtol=1e-5)
    summary = structure_summary(model)
    assert summary["pruned_heads"] == {k: sorted(v) for k, v in heads.items()}
    assert summary["pruned_neurons"] == {k: sorted(v) for k, v in neurons.items()}

    model.save_pretrained(tmp_path)  # plain save_pretrained: the structure travels in config.json
    reloaded = hf_prune.load_pruned(str(tmp_path), attn_implementation="eager")
    assert type(reloaded) is type(model)
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert structure_summary(reloaded)["heads_per_layer"] == summary["heads_per_layer"]


@pytest.mark.parametrize("family", ["electra", "qwen3", "gemma2"])
def test_regression_a_family_without_width_support_reloads_after_head_and_neuron_removal(family, tmp_path):
    """The saved model was refused by load_pruned because a width allow-list was consulted with no width removed."""
    model = build(family)
    hf_prune.prune_heads(model, {0: list(range(group_size_of(attention_sites(model)[0].spec,
                                                             attention_sites(model)[0].layer)))})
    hf_prune.prune_ffn_neurons(model, {1: [0, 3]})
    batch = inputs(family)
    expected = outputs(model, batch)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(outputs(hf_prune.load_pruned(str(tmp_path), attn_implementation="eager"), batch), expected, atol=1e-5, rtol=1e-5)


def test_albert_is_refused_with_the_reason():
    model = transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=99))
    with pytest.raises(ValueError, match="ALBERT shares one layer's weights"):
        hf_prune.prune_heads(model, {0: [1]})


def test_an_unknown_family_names_what_was_found_and_how_to_register():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Linear(8, 8)

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    with pytest.raises(ValueError, match=r"'blocks'.*Block layers.*mixer.*register_layout"):
        hf_prune.prune_heads(model, {0: [0]})


def test_t5_blocks_keep_a_head_for_the_position_bias_they_hand_on():
    model = build("t5")
    with pytest.raises(ValueError, match="position bias is handed on"):
        hf_prune.prune_heads(model, {0: [0, 1, 2, 3]})
    # Selection never empties a block: 3/4 of all heads gone leaves one head in every block.
    scores = hf_prune.compute_head_importance(model, [inputs("t5")], method="activation", progress=False)
    chosen = hf_prune.select_heads_to_prune(scores, 0.75, model=model)
    assert all(len(heads) == 3 for heads in chosen.values()) and len(chosen) == 6
    hf_prune.prune_heads(model, chosen)
    assert structure_summary(model)["heads_per_layer"] == [1] * 6


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["activation", "gradient", "taylor"])
def test_neurons_inside_experts_are_scored_selected_evenly_and_removed(family, method):
    """Every routed expert's neurons (and the shared expert's) get scores in the layer's numbering; the selection
    is removable (on Transformers 5 every expert keeps the same multiple of 4 neurons) and removal keeps outputs."""
    model = build(family)
    batch = with_labels(family, inputs(family))
    _, layers = find_layers(model)
    moe = layers.layout(0).moe
    total = hf_prune.structure.layout.moe_neuron_total(moe, layers[0])
    scores = hf_prune.compute_neuron_importance(model, [batch], method=method, progress=False)
    assert [len(row) for row in scores.values()] == [total] * len(layers)
    assert all(bool((row > 0).all()) for row in scores.values())  # every expert saw tokens: two of four per token
    chosen = hf_prune.select_neurons_to_prune(scores, 0.3, model=model)
    if MAJOR >= 5:
        size = hf_prune.structure.layout.expert_size(moe, layers[0])
        for layer, units in chosen.items():
            per_expert = [sum(1 for n in units if e * size <= n < (e + 1) * size) for e in range(4)]
            assert len(set(per_expert)) == 1 and (size - per_expert[0]) % 4 == 0
    plain = {k: v for k, v in batch.items() if k != "labels"}
    pieces = [piece for slot in neuron_slots(model) for piece in slot.pieces()]
    with hf_prune.structure.expert_probes(pieces):  # scoring runs fused experts expert by expert: same outputs
        torch.testing.assert_close(outputs(model, plain), outputs(build(family), plain), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for layer, units in chosen.items():
            for piece in neuron_slots(model)[layer].pieces():
                matrix = piece.matrix_of(piece.leaf)
                for n in units:
                    if n in piece.kept:
                        matrix[:, piece.kept.index(n)] = 0
    expected = outputs(model, plain)
    hf_prune.prune_ffn_neurons(model, chosen)
    torch.testing.assert_close(outputs(model, plain), expected, atol=1e-5, rtol=1e-5)
    assert sum(structure_summary(model)["intermediate_sizes"]) == len(layers) * total - sum(map(len, chosen.values()))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_removing_experts_equals_the_model_built_with_fewer_experts(family, tmp_path):
    """Transformers' own model with one expert fewer per layer, holding the other experts' weights (sliced here by
    hand from the state dict), is the reference; the pruned model, and its reload, compute the same."""
    import re

    model = build(family)
    batch = inputs(family)
    drop = {0: 1, 1: 2}  # layer -> expert removed
    state = {}
    for key, value in model.state_dict().items():
        layer = re.search(r"layers\.(\d+)\.", key)
        gone = drop[int(layer.group(1))] if layer else None
        listed = re.search(r"experts\.(\d+)\.", key)
        if listed:  # 4.x: one module per expert
            e = int(listed.group(1))
            if e == gone:
                continue
            key = key.replace(f"experts.{e}.", f"experts.{e - (e > gone)}.")
        elif key.endswith(("gate.weight", "experts.gate_up_proj", "experts.down_proj")) and "shared" not in key:
            value = torch.cat([value[:gone], value[gone + 1:]])
        state[key] = value
    config = copy.deepcopy(model.config)
    field = "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"
    setattr(config, field, getattr(config, field) - 1)
    reference = type(model)(config).eval()
    reference.load_state_dict(state)
    expected = outputs(reference, batch)

    hf_prune.prune_experts(model, {layer: [e] for layer, e in drop.items()})
    torch.testing.assert_close(outputs(model, batch), expected, atol=1e-5, rtol=1e-5)
    summary = structure_summary(model)
    assert summary["pruned_experts"] == {0: [1], 1: [2]} and summary["experts_per_layer"] == [3, 3]
    # Neurons of a removed expert are gone with it; the others keep their original ids (expert * size + neuron).
    size = hf_prune.structure.layout.expert_size(find_layers(model)[0].moe, find_layers(model)[1][0])
    hf_prune.prune_ffn_neurons(model, {0: [e * size + n for e in (0, 1, 2, 3) for n in range(4)]})
    assert structure_summary(model)["pruned_neurons"][0] == [e * size + n for e in (0, 2, 3) for n in range(4)]
    model.save_pretrained(tmp_path)
    assert model.config.hf_prune_structure["format_version"] == 3
    reloaded = hf_prune.load_pruned(str(tmp_path), attn_implementation="eager")
    torch.testing.assert_close(outputs(reloaded, batch), outputs(model, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="top_k=2"):
        hf_prune.prune_experts(model, {0: [0, 2]})


def test_expert_importance_removes_the_least_routed_expert_of_each_layer():
    from hf_prune.units import prune_experts_by_importance

    model = build("mixtral")
    scores = hf_prune.compute_expert_importance(model, [inputs("mixtral")], progress=False)
    assert set(scores) == {0, 1} and all(len(row) == 4 for row in scores.values())
    for row in scores.values():  # mean router probabilities: each token's add up to one
        torch.testing.assert_close(row.sum(), torch.tensor(1.0))
    removed = prune_experts_by_importance(model, [inputs("mixtral")], per_layer=1, progress=False)
    assert removed == {layer: [int(row.argmin())] for layer, row in scores.items()}
    assert structure_summary(model)["experts_per_layer"] == [3, 3]


def test_a_registered_layout_reaches_a_new_family():
    """A family the table does not know becomes prunable with one registration (GPT-2's blocks renamed)."""
    from hf_prune.structure import AttentionLayout, Layout, MlpLayout, register_layout, unregister_layout

    model = build("gpt2")
    for block in model.transformer.h:
        block.mixer = block.attn
        del block.attn
    reference = copy.deepcopy(model)
    layout = Layout(
        name="renamed-gpt2",
        attentions=(AttentionLayout(owner="mixer", core="mixer", output="mixer.c_proj", qkv="mixer.c_attn",
                                    width_attrs=("split_size",)),),
        mlp=MlpLayout(owner="mlp", inputs=("mlp.c_fc",), output="mlp.c_proj", activation="mlp.act"),
    )
    register_layout(layout)
    try:
        hf_prune.prune_heads(model, {1: [2]})
        assert find_layers(model)[0].name == "renamed-gpt2"
        assert model.transformer.h[1].mixer.c_proj.weight.shape[0] == 3 * 8
    finally:
        unregister_layout("renamed-gpt2")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())


# ------------------------------------------------------------------------------------------------ the other axes
SINGLE_STACK = [f for f in sorted(FAMILIES) if FAMILIES[f][3] not in ("seq2seq", "speech")]
DECODERS = [f for f in sorted(FAMILIES) if FAMILIES[f][2].endswith(("CausalLM", "LMHeadModel"))]
# Families whose hidden size (width) hf_prune removes; the others refuse with the reason, tested below.
WIDTH = ["bart", "vit", "mixtral", "qwen2_moe", "whisper", "bert", "deberta-v2", "deberta-v3", "distilbert", "electra", "gpt2", "llama", "mpnet", "t5-gated", "mistral", "modernbert", "opt", "phi3", "qwen2", "qwen3", "roberta", "xlm-roberta"]


@pytest.mark.parametrize("family", SINGLE_STACK)
def test_layers_removed_reload_and_the_rest_of_the_model_is_untouched(family, tmp_path):
    model = build(family)
    batch = inputs(family)
    _, layers = find_layers(model)
    kept_layer = copy.deepcopy(layers[1].state_dict())
    hf_prune.prune_layers(model, [0])
    _, layers = find_layers(model)
    assert len(layers) == 1
    for name, tensor in layers[0].state_dict().items():
        torch.testing.assert_close(tensor, kept_layer[name], atol=0, rtol=0)
    expected = outputs(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = hf_prune.load_pruned(str(tmp_path), attn_implementation="eager")
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", WIDTH)
def test_zeroed_hidden_channels_removed_exactly_and_reloaded(family, tmp_path):
    model = build(family)
    batch = inputs(family)
    hf_prune.zero_hidden_channels(model, [1, 7, 30, 31])
    expected = outputs(model, batch)
    scores = hf_prune.compute_channel_importance(model, [batch], progress=False)  # what prune_width ranks by
    assert scores.shape == (32,) and bool((scores[[1, 7, 30, 31]] == 0).all()) and int((scores > 0).sum()) >= 20
    hf_prune.prune_hidden(model, [1, 7, 30, 31], exact=True)
    assert model.config.hidden_size == 28
    torch.testing.assert_close(outputs(model, batch), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = hf_prune.load_pruned(str(tmp_path), attn_implementation="eager")
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(WIDTH)))
def test_width_pruning_elsewhere_is_refused_with_a_reason(family):
    model = build(family)
    with pytest.raises(ValueError, match="width pruning"):
        hf_prune.prune_hidden(model, [1, 7])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_importance_scores_every_unit_and_empty_structures_are_found(family):
    model = build(family)
    batch = inputs(family)
    sites = attention_sites(model)
    heads = hf_prune.compute_head_importance(model, [batch], method="activation", progress=False)
    assert heads.shape[0] == len(sites) and bool((heads > 0).any())
    heads_plan, neurons_plan = plan(model)
    _, layers = find_layers(model)
    last = len(sites) - 1
    found = hf_prune.remove_empty_structures(model)
    # Zeroed output columns are exactly what remove_empty_structures looks for.
    assert found["heads"] == {k: sorted(v) for k, v in heads_plan.items()}
    assert found["neurons"] == {k: sorted(v) for k, v in neurons_plan.items()}
    if not sites[last].spec.shared_position_bias:
        assert structure_summary(model)["heads_per_layer"][last] == 0
    if neurons_plan:
        neurons = hf_prune.compute_neuron_importance(model, [batch], method="activation", progress=False)
        assert all(float(neurons[layer][unit]) == 0 for layer, units in neurons_plan.items() for unit in units)


@pytest.mark.parametrize("family", DECODERS + ["bart", "t5"])
def test_generate_with_the_key_value_cache_after_removal(family, tmp_path):
    model = build(family)
    prompt = inputs(family)["input_ids"][:1]
    plan(model)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    heads, neurons = plan(model)
    hf_prune.prune_heads(model, heads)
    if neurons:
        hf_prune.prune_ffn_neurons(model, neurons)
    assert torch.equal(model.generate(prompt, **kwargs), expected)
    model.save_pretrained(tmp_path)
    reloaded = hf_prune.load_pruned(str(tmp_path), attn_implementation="eager")
    assert torch.equal(reloaded.generate(prompt, **kwargs), expected)


@pytest.mark.parametrize("task", ["TokenClassification", "QuestionAnswering", "MaskedLM"])
def test_task_heads_beyond_sequence_classification_survive_removal_and_reload(task, tmp_path):
    config = transformers.BertConfig(**ENCODER)
    torch.manual_seed(0)
    model = spread_weights(getattr(transformers, f"BertFor{task}")(config)).eval()
    batch = inputs("bert")
    first = lambda m: (m(**batch)[0]).double()  # noqa: E731 (logits or start logits)
    heads, neurons = plan(model)
    with torch.no_grad():
        expected = first(model)
        hf_prune.prune_heads(model, heads)
        hf_prune.prune_ffn_neurons(model, neurons)
        hf_prune.prune_layers(model, [1])
        torch.testing.assert_close(first(model).shape, expected.shape)
        expected = first(model)
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(first(hf_prune.load_pruned(str(tmp_path))), expected, atol=1e-5, rtol=1e-5)


def with_labels(family: str, batch: dict) -> dict:
    model_name, kind = FAMILIES[family][2], FAMILIES[family][3]
    if model_name.endswith(("CausalLM", "LMHeadModel")):
        return {**batch, "labels": batch["input_ids"]}
    if kind in ("seq2seq", "speech"):
        return {**batch, "labels": batch["decoder_input_ids"]}
    if kind == "audio":
        return {**batch, "labels": torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(0))}
    return {**batch, "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradual_structured_pruning_masks_then_removes_to_the_same_outputs(family):
    """What PruningTrainer runs: Taylor scores from a real backward pass, masks, then physical removal."""
    from hf_prune import PruningConfig, Pruner

    model = build(family)
    batch = with_labels(family, inputs(family))
    config = PruningConfig(target_sparsity=0.0, head_sparsity=0.25, neuron_sparsity=0.25,
                           warmup_fraction=0.0, cooldown_fraction=0.0)
    pruner = Pruner(model, config)
    pruner.start(total_steps=1)
    model.train()
    model(**batch).loss.backward()
    pruner.before_optimizer_step()
    pruner.update(1)
    model.eval()
    plain = {k: v for k, v in batch.items() if k != "labels"}
    masked = outputs(model, plain)
    heads_before = sum(structure_summary(model)["heads_per_layer"])
    removed = pruner.finish()
    assert sum(map(len, removed["heads"].values())) == heads_before // 4
    assert sum(map(len, removed["neurons"].values())) > 0
    torch.testing.assert_close(outputs(model, plain), masked, atol=1e-5, rtol=1e-5)


@pytest.mark.onnx
@pytest.mark.parametrize("family", ["deberta-v2", "modernbert", "vit", "phi3", "wav2vec2"])
def test_a_pruned_model_of_another_family_exports_to_onnx_runtime(family, tmp_path):
    """Optimum's exporter on the pruned, reloaded model; ONNX Runtime checked against PyTorch by export_onnx."""
    pytest.importorskip("optimum.onnxruntime")
    model = build(family)
    heads, neurons = plan(model)
    hf_prune.prune_heads(model, heads)
    hf_prune.prune_ffn_neurons(model, neurons)
    model.save_pretrained(tmp_path / "model")
    result = hf_prune.export_onnx(str(tmp_path / "model"), str(tmp_path / "onnx"))
    assert result.max_abs_diff["fp32"] < 1e-4


@pytest.mark.parametrize("family", ["bart", "whisper", "t5", "t5-gated"])
def test_encoder_decoder_layers_removed_per_stack_reload(family, tmp_path):
    """Layers of both stacks, numbered encoder first; each stack's config count follows; heads keyed by attention
    block stay in their original numbering through the record."""
    model = build(family)
    batch = inputs(family)
    _, layers = find_layers(model)
    encoder = len(layers.stacks[0].layers)
    heads, neurons = plan(model)
    hf_prune.prune_heads(model, heads)
    hf_prune.prune_ffn_neurons(model, neurons)
    hf_prune.prune_layers(model, [1, encoder + 1])  # the second layer of each stack (T5's first ones hold the bias)
    assert [len(stack.layers) for stack in find_layers(model)[1].stacks] == [1, 1]
    expected = outputs(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = hf_prune.load_pruned(str(tmp_path), attn_implementation="eager")
    torch.testing.assert_close(outputs(reloaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert structure_summary(reloaded)["heads_per_layer"] == structure_summary(model)["heads_per_layer"]
    kwargs = dict(max_new_tokens=4, do_sample=False)
    prompt = {k: v[:1] for k, v in batch.items() if k != "decoder_input_ids"}
    assert torch.equal(model.generate(**prompt, **kwargs), reloaded.generate(**prompt, **kwargs))
    if family.startswith("t5"):
        with pytest.raises(ValueError, match="relative position bias"):
            hf_prune.prune_layers(build(family), [encoder])


@pytest.mark.onnx
@pytest.mark.parametrize("family", ["bart", "t5-gated", "whisper"])
def test_a_pruned_encoder_decoder_exports_as_two_verified_graphs_that_generate_as_pytorch(family, tmp_path):
    """Optimum writes an encoder and a decoder graph; export_onnx checks each (fp32 and INT8) against PyTorch and
    create_session serves them together: greedy generation in ONNX Runtime gives PyTorch's tokens."""
    pytest.importorskip("optimum.onnxruntime")
    if family == "whisper":
        # Optimum traces Whisper's encoder on 3000 frames of 80 bins: the config must take them.
        config_name, kwargs, model_name, _ = FAMILIES[family]
        FAMILIES["whisper-export"] = (config_name, dict(kwargs, max_source_positions=1500, num_mel_bins=80),
                                      model_name, "speech")
        try:
            model = build("whisper-export")
        finally:
            del FAMILIES["whisper-export"]
    else:
        model = build(family)
    heads, neurons = plan(model)
    hf_prune.prune_heads(model, heads)
    hf_prune.prune_ffn_neurons(model, neurons)
    model.save_pretrained(tmp_path / "model")
    result = hf_prune.export_onnx(str(tmp_path / "model"), str(tmp_path / "onnx"), optimize=None, quantize="dynamic")

    assert result.graphs == ["encoder_model", "decoder_model"]
    assert result.task == ("automatic-speech-recognition" if family == "whisper" else "text2text-generation")
    for graph in result.graphs:
        assert result.max_abs_diff[f"{graph}/fp32"] < 1e-4
        assert (tmp_path / "onnx" / result.files[f"{graph}/int8"]).is_file()
    with pytest.raises(hf_prune.export.ExportError, match="2 graphs"):
        result.best_file

    session = hf_prune.create_session(tmp_path / "onnx", variant="fp32")
    reloaded = hf_prune.load_pruned(str(tmp_path / "model"), attn_implementation="eager")
    if family == "whisper":
        prompt = {"input_features": torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))}
    else:
        prompt = {k: v[:1] for k, v in inputs(family).items() if k != "decoder_input_ids"}
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(session.generate(**prompt, **kwargs), reloaded.generate(**prompt, **kwargs))
    with pytest.raises(ValueError, match="without the decoder.s key/value cache"):
        hf_prune.export_onnx(str(tmp_path / "model"), str(tmp_path / "again"), task=f"{result.task}-with-past")
    assert not (tmp_path / "again").exists()


@pytest.mark.onnx
def test_an_encoder_decoder_classifier_exports_as_one_graph(tmp_path):
    """BART's sequence classifier runs encoder and decoder inside one graph: it exports and serves like an encoder."""
    pytest.importorskip("optimum.onnxruntime")
    torch.manual_seed(0)
    model = spread_weights(transformers.BartForSequenceClassification(transformers.BartConfig(**SEQ2SEQ))).eval()
    heads, neurons = plan(model)
    hf_prune.prune_heads(model, heads)
    hf_prune.prune_ffn_neurons(model, neurons)
    result = hf_prune.export_onnx(model, str(tmp_path / "onnx"), quantize="dynamic")
    assert result.graphs == ["model"] and result.task == "text-classification"
    assert result.max_abs_diff["fp32"] < 1e-4 and "int8" in result.files
    assert type(hf_prune.create_session(tmp_path / "onnx")).__name__ == "ORTModelForSequenceClassification"


def test_sensitivity_groups_of_an_encoder_decoder_leave_heads_out_and_say_why():
    from hf_prune.sensitivity import sensitivity_groups

    model = build("bart")
    kinds = {group["kind"] for group in sensitivity_groups(model).values()}
    assert "heads" not in kinds and {"attention", "neurons", "layer"} <= kinds
    with pytest.raises(ValueError, match="self- and cross-attention"):
        sensitivity_groups(model, kinds=["heads"])
    assert {g["kind"] for g in sensitivity_groups(build("phi3"), kinds=["heads", "neurons"]).values()} == {
        "heads", "neurons"}
