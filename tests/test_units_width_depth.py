"""Importance of hidden channels and layers, and which ones to remove (Minitron-style width and depth pruning)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, HIDDEN, build_deep_model, build_model, layers_of, make_batches

from hf_prune import (
    ChannelCriterion,
    LayerCriterion,
    available_channel_criteria,
    compute_channel_importance,
    compute_layer_importance,
    load_pruned,
    prune_hidden,
    prune_layers,
    register_channel_criterion,
    register_layer_criterion,
    save_pruned,
    select_channels_to_prune,
    select_layers_to_prune,
    structure_summary,
    zero_hidden_channels,
)
from hf_prune.structure import hidden_channel_parameters
from hf_prune.units import unregister_channel_criterion, unregister_layer_criterion
from hf_prune.units.base import model_loss

# Six channels: Llama's 48 -> 42 stays a multiple of its 6 heads, which Transformers 5's LlamaConfig requires.
ZEROED = [1, 6, 9, 14, 20, 27]


def norms_of(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


def make_identity(layer, arch):
    """Zero what a pre-LN layer writes into the residual stream: it then returns its input exactly."""
    with torch.no_grad():
        writers = (layer.attn.c_proj, layer.mlp.c_proj) if arch == "gpt2" else (layer.self_attn.o_proj, layer.mlp.down_proj)
        for module in writers:
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()


# ------------------------------------------------------------------------------------------------ channels
@pytest.mark.parametrize("arch", ARCHS)
def test_activation_importance_follows_the_norm_outputs(arch):
    model = build_model(arch)
    batches = make_batches(arch)
    zero_hidden_channels(model, ZEROED)
    with torch.no_grad():
        for norm in norms_of(model):  # channel 4 ten times larger at the output of every norm
            norm.weight[4] *= 10
            if getattr(norm, "bias", None) is not None:
                norm.bias[4] *= 10
    model.train()
    scores = compute_channel_importance(model, batches, progress=False)
    assert scores.shape == (HIDDEN[arch],) and scores.dtype == torch.float32
    assert torch.all(scores[ZEROED] == 0)
    assert (scores[[c for c in range(HIDDEN[arch]) if c not in ZEROED]] > 0).all()
    assert int(scores.argmax()) == 4
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())

    # Removed exactly, the channels left score the same, still in the original numbering.
    prune_hidden(model, ZEROED, exact=True)
    after = compute_channel_importance(model, batches, progress=False)
    assert after.shape == (HIDDEN[arch],) and torch.all(after[ZEROED] == 0)
    torch.testing.assert_close(after, scores, atol=1e-5, rtol=1e-5)


def test_activation_importance_ignores_padding():
    model = build_model("bert")
    batch = make_batches("bert", n=1)[0]
    batch["attention_mask"][:, 5:] = 0
    other = {**batch, "input_ids": batch["input_ids"].clone()}
    other["input_ids"][:, 5:] = 7  # different padding tokens, same real tokens
    a = compute_channel_importance(model, [batch], progress=False)
    b = compute_channel_importance(model, [other], progress=False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_taylor_importance_is_the_gradient_of_a_channel_gate():
    """|dL/ds| for a gate s scaling every parameter that writes channel c, checked by central differences."""
    model = build_model("bert").double()
    batch = make_batches("bert", n=1)[0]
    scores = compute_channel_importance(model, [batch], method="taylor", progress=False)
    assert scores.dtype == torch.float32 and (scores >= 0).all()
    params = hidden_channel_parameters(model)
    eps = 1e-4

    def loss_with_gate(channel, gate):
        scaled = copy.deepcopy(model)
        named = dict(scaled.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, _, dim in params:
                named[name].select(dim, channel).mul_(gate)
            return float(model_loss(scaled, batch))

    for channel in (0, 13, 31):
        numeric = abs(loss_with_gate(channel, 1 + eps) - loss_with_gate(channel, 1 - eps)) / (2 * eps)
        assert scores[channel].item() == pytest.approx(numeric, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "distilbert"])
def test_taylor_importance_of_zeroed_and_removed_channels_is_zero(arch):
    model = build_model(arch)
    zero_hidden_channels(model, ZEROED)
    scores = compute_channel_importance(model, make_batches(arch), method="taylor", progress=False)
    assert torch.all(scores[ZEROED] == 0) and scores.sum() > 0
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    removed = [0, 2, 3, 4, 5, 10]
    prune_hidden(model, removed)
    after = compute_channel_importance(model, make_batches(arch), method="taylor", progress=False)
    assert after.shape == (HIDDEN[arch],) and torch.all(after[removed] == 0) and after.sum() > 0


def test_unknown_channel_method_raises():
    with pytest.raises(ValueError, match=r"method='magnitude'.*'activation', 'taylor'"):
        compute_channel_importance(build_model("bert"), make_batches("bert"), method="magnitude")


def test_a_registered_channel_criterion_is_used_by_name():
    """A decorator-registered criterion runs through `compute_channel_importance` in the ORIGINAL numbering."""
    seen = []

    @register_channel_criterion("last_channels_first")
    class LastChannelsFirst(ChannelCriterion):
        """Scores kept channel i as i + 1 (a ranking no data-driven criterion gives) and counts the batches."""

        def score(self, model, batches, width):
            seen.append((model.training, sum(1 for _ in batches)))
            return torch.arange(1, width + 1, dtype=torch.float32)

    try:
        assert LastChannelsFirst.name == "last_channels_first" and "last_channels_first" in available_channel_criteria()
        model = build_model("bert")
        prune_hidden(model, [0, 5])
        scores = compute_channel_importance(model, make_batches("bert"), method="last_channels_first", progress=False)
        kept = [c for c in range(HIDDEN["bert"]) if c not in (0, 5)]
        assert scores[[0, 5]].tolist() == [0.0, 0.0]
        torch.testing.assert_close(scores[kept], torch.arange(1, len(kept) + 1, dtype=torch.float32))
        assert seen == [(False, len(make_batches("bert")))]  # eval mode, every batch
        with pytest.raises(ValueError, match=r"compute_channel_importance: method='nope' is invalid.*"
                                             r"'activation', 'taylor', 'last_channels_first'.*register_channel_criterion"):
            compute_channel_importance(model, make_batches("bert"), method="nope", progress=False)
    finally:
        unregister_channel_criterion("last_channels_first")
    assert available_channel_criteria() == ("activation", "taylor")


def test_a_channel_criterion_with_the_wrong_shape_is_named():
    class TooShort(ChannelCriterion):
        def score(self, model, batches, width):
            return torch.ones(width - 1)

    register_channel_criterion("too_short", TooShort)
    try:
        with pytest.raises(TypeError, match=r"TooShort.score returned \(31,\).*shape \(32,\)"):
            compute_channel_importance(build_model("bert"), make_batches("bert"), method="too_short", progress=False)
    finally:
        unregister_channel_criterion("too_short")


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_block_influence(arch):
    model = build_deep_model(arch, num_layers=4)
    make_identity(layers_of(model, arch)[2], arch)
    batches = make_batches(arch)
    scores = compute_layer_importance(model, batches, progress=False)
    assert scores.shape == (4,)
    assert scores[2] < 1e-6 and (scores[[0, 1, 3]] > 1e-3).all()
    # Layer 0 by hand: hidden_states[0] goes in, hidden_states[1] comes out.
    expected = 0.0
    for batch in batches:
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states
        expected += 1 - torch.nn.functional.cosine_similarity(states[0], states[1], dim=-1).mean().item()
    assert scores[0].item() == pytest.approx(expected / len(batches), rel=1e-5)

    prune_layers(model, [1])
    after = compute_layer_importance(model, batches, progress=False)
    assert after.shape == (4,) and after[1] == 0 and after[2] < 1e-6


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_loss_importance_is_the_loss_change_of_removing_the_layer(arch):
    model = build_deep_model(arch, num_layers=3)
    if arch == "gpt2":
        make_identity(layers_of(model, arch)[1], arch)
    batch = make_batches(arch, n=1)[0]
    scores = compute_layer_importance(model, [batch], method="loss", progress=False)
    with torch.no_grad():
        base = float(model_loss(model, batch))
        for layer in range(3):
            removed = prune_layers(copy.deepcopy(model), [layer])
            assert scores[layer].item() == pytest.approx(float(model_loss(removed, batch)) - base, abs=1e-5)
    if arch == "gpt2":
        assert scores[1] == 0


def test_a_registered_layer_criterion_is_used_by_name():
    class FirstLayersFirst(LayerCriterion):
        """Scores present layer i as -i, whatever the data."""

        def score(self, model, layers, batches):
            for _ in batches:
                pass
            return -torch.arange(len(layers), dtype=torch.float32)

    assert register_layer_criterion("first_layers_first", FirstLayersFirst) is FirstLayersFirst  # the call form
    try:
        model = build_deep_model("llama", num_layers=4)
        prune_layers(model, [1])
        scores = compute_layer_importance(model, make_batches("llama"), method="first_layers_first", progress=False)
        assert scores.tolist() == [0.0, 0.0, -1.0, -2.0]  # layer 1 removed: 0; layers 0, 2, 3 are present 0, 1, 2
        assert select_layers_to_prune(scores, 2, model=model) == [1, 3]
    finally:
        unregister_layer_criterion("first_layers_first")


def test_unknown_layer_method_raises():
    with pytest.raises(ValueError, match=r"compute_layer_importance: method='cosine' is invalid.*"
                                         r"'block_influence', 'loss'.*register_layer_criterion"):
        compute_layer_importance(build_deep_model("llama", num_layers=2), make_batches("llama"), method="cosine")


# ------------------------------------------------------------------------------------------------ selection
def test_select_channels_lowest_first_with_already_removed_counted():
    importance = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 7.0])
    assert select_channels_to_prune(importance, 0.25) == [1, 3]
    assert select_channels_to_prune(importance, 0.25, already_pruned=[7]) == [3, 7]
    assert select_channels_to_prune(importance, 0.25, already_pruned=[6, 7, 0]) == [0, 6, 7]  # never un-removed
    assert select_channels_to_prune(importance, 0.4, multiple_of=4) == [1, 2, 3, 5]  # keep 4, not 5
    assert select_channels_to_prune(importance, 0.0) == []
    for fraction in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"fraction={fraction}.*\[0, 1\)"):
            select_channels_to_prune(importance, fraction)
    with pytest.raises(ValueError, match="already_pruned=\\[8\\]"):
        select_channels_to_prune(importance, 0.5, already_pruned=[8])


def test_select_channels_reads_the_model():
    model = build_model("bert")
    prune_hidden(model, [30, 31])
    importance = torch.arange(32, dtype=torch.float32)
    assert select_channels_to_prune(importance, 0.125, model=model) == [0, 1, 30, 31]
    with pytest.raises(ValueError, match="16 scores but the model has 32"):
        select_channels_to_prune(importance[:16], 0.1, model=model)


def test_select_layers():
    importance = torch.tensor([0.9, 0.1, 0.5, 0.2])
    assert select_layers_to_prune(importance, 2) == [1, 3]
    assert select_layers_to_prune(importance, 2, already_pruned=[0]) == [0, 1]
    for count in (4, -1, 1.5):
        with pytest.raises(ValueError, match=rf"count={count}.*0 to 3"):
            select_layers_to_prune(importance, count)
    model = build_deep_model("llama", num_layers=4)
    prune_layers(model, [2])
    assert select_layers_to_prune(importance, 2, model=model) == [1, 2]


def test_minitron_style_width_and_depth_end_to_end(tmp_path):
    """Score on calibration batches, select, remove, save and reload a Llama-style model."""
    model = build_deep_model("llama", num_layers=4)
    batches = make_batches("llama", labels=False)
    channels = select_channels_to_prune(compute_channel_importance(model, batches, progress=False), 0.25,
                                        multiple_of=model.config.num_attention_heads)
    layers = select_layers_to_prune(compute_layer_importance(model, batches, progress=False), 1)
    prune_hidden(model, channels)
    prune_layers(model, layers)
    summary = structure_summary(model)
    assert summary["hidden_size"] == 36 and summary["num_layers"] == 3
    save_pruned(model, str(tmp_path))
    loaded = load_pruned(str(tmp_path))
    batch = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
