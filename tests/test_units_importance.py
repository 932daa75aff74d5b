"""Head and neuron importance (gates on projection inputs) and the selection of what to remove."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    ARCHS,
    GROUP,
    HEAD_DIM,
    HEADS,
    INTERMEDIATE,
    build_model,
    down_projection,
    layers_of,
    make_batches,
    output_projection,
)

from hf_prune.units import (
    compute_head_importance,
    compute_neuron_importance,
    select_heads_to_prune,
    select_neurons_to_prune,
)
from hf_prune.structure import prune_ffn_neurons, prune_heads, structure_summary

METHODS = ["gradient", "activation", "taylor"]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_head_importance_leaves_the_model_as_it_was(arch, method):
    model = build_model(arch).train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = snapshot(model)

    scores = compute_head_importance(model, make_batches(arch), method=method, progress=False)

    assert scores.shape == (2, HEADS[arch]) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores > 0).all()
    assert all(m.training for m in model.modules())  # train mode restored, module by module
    assert not frozen.requires_grad and all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_head_whose_output_is_zeroed_scores_zero(arch, method):
    model = build_model(arch)
    with torch.no_grad():
        output_projection(layers_of(model, arch)[1], arch)[:, 2 * HEAD_DIM : 3 * HEAD_DIM] = 0

    scores = compute_head_importance(model, make_batches(arch), method=method, normalize_layers=False, progress=False)

    assert scores[1, 2] == 0
    others = torch.ones_like(scores, dtype=torch.bool)
    others[1, 2] = False
    assert (scores[others] > 0).all()
    selected = select_heads_to_prune(scores, 1 / scores.numel(), group_size=1)
    assert selected == {1: [2]}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_gradient_importance_is_the_loss_sensitivity_to_the_head(arch):
    """For one example, the score is |dL/d gate|: the finite difference of the loss when the head is scaled down."""
    model = build_model(arch).to(torch.float64)
    batch = make_batches(arch, n=1, batch_size=1)[0]
    scores = compute_head_importance(model, [batch], normalize_layers=False, progress=False)
    layer, head, eps = 1, 2, 1e-3  # (the LM loss is computed in float32 whatever the model dtype)
    labels = batch.get("labels", batch["input_ids"])

    def loss():
        with torch.no_grad():
            return model(**dict(batch, labels=labels)).loss.item()

    full = loss()
    with torch.no_grad():
        output_projection(layers_of(model, arch)[layer], arch)[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] *= 1 - eps
    assert scores[layer, head].item() == pytest.approx(abs(full - loss()) / eps, rel=1e-2)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_importance_of_a_pruned_model_keeps_the_original_numbering(arch):
    model = build_model(arch)
    group = GROUP[arch]
    heads = {0: list(range(group, 2 * group)), 1: list(range(HEADS[arch]))}  # layer 1 loses every head
    prune_heads(model, heads)
    for method in METHODS:
        scores = compute_head_importance(model, make_batches(arch), method=method, progress=False)
        assert scores.shape == (2, HEADS[arch])
        assert (scores[1] == 0).all() and (scores[0, heads[0]] == 0).all()
        kept = [h for h in range(HEADS[arch]) if h not in heads[0]]
        assert (scores[0, kept] > 0).all()
        torch.testing.assert_close(scores[0].norm(), torch.tensor(1.0))  # layer-normalised


def test_normalize_layers():
    model = build_model("gpt2")
    raw = compute_head_importance(model, make_batches("gpt2"), normalize_layers=False, progress=False)
    normalised = compute_head_importance(model, make_batches("gpt2"), progress=False)
    torch.testing.assert_close(normalised, raw / raw.norm(dim=1, keepdim=True))


def test_loss_needs_labels_or_a_language_model():
    lm = build_model("gpt2")
    compute_head_importance(lm, make_batches("gpt2", labels=False), progress=False)  # labels = input_ids
    classifier = build_model("bert")
    unlabeled = make_batches("bert", labels=False)
    with pytest.raises(ValueError, match="returned no loss"):
        compute_head_importance(classifier, unlabeled, progress=False)
    assert compute_head_importance(classifier, unlabeled, method="activation", progress=False).shape == (2, 4)
    with pytest.raises(ValueError, match="method"):
        compute_head_importance(classifier, unlabeled, method="magnitude", progress=False)
    assert all(p.requires_grad for p in classifier.parameters())  # restored after the error too


def test_max_batches_and_padding():
    model = build_model("bert")
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    batches = make_batches("bert", n=3)
    compute_head_importance(model, batches, max_batches=1, progress=False)
    assert len(calls) == 1
    # Activation scores ignore padded positions: padding more tokens of an otherwise equal batch changes nothing.
    batch = make_batches("bert", n=1)[0]
    padded = {k: v.clone() for k, v in batch.items()}
    padded["attention_mask"][:, -2:] = 0
    scores = compute_head_importance(model, [padded], method="activation", normalize_layers=False, progress=False)
    changed = {k: v.clone() for k, v in padded.items()}
    changed["input_ids"][:, -2:] = 5
    again = compute_head_importance(model, [changed], method="activation", normalize_layers=False, progress=False)
    torch.testing.assert_close(scores, again)
    with pytest.raises(ValueError, match="no batches"):
        compute_head_importance(model, [], progress=False)


# ------------------------------------------------------------------------------------------------ neurons
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_neuron_importance(arch, method):
    model = build_model(arch).train()
    with torch.no_grad():
        down_projection(layers_of(model, arch)[0], arch)[:, [4, 9]] = 0
    before = snapshot(model)

    scores = compute_neuron_importance(model, make_batches(arch), method=method, progress=False)

    assert sorted(scores) == [0, 1]
    for row in scores.values():
        assert row.shape == (INTERMEDIATE[arch],) and row.dtype == torch.float32
        assert torch.isfinite(row).all() and (row >= 0).all()
    assert (scores[0][[4, 9]] == 0).all()
    assert (scores[0] > 0).sum() == INTERMEDIATE[arch] - 2 and (scores[1] > 0).all()
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_neuron_importance_of_a_pruned_model(arch):
    model = build_model(arch)
    prune_ffn_neurons(model, {0: [1, 2, 3], 1: list(range(INTERMEDIATE[arch]))})
    scores = compute_neuron_importance(model, make_batches(arch), progress=False)
    assert scores[0].shape == (INTERMEDIATE[arch],) and (scores[0][[1, 2, 3]] == 0).all()
    assert (scores[1] == 0).all()


# ------------------------------------------------------------------------------------------------ selection
def test_select_heads_is_global_and_exact():
    importance = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.2, 0.3, 0.95, 0.05]])
    assert select_heads_to_prune(importance, 0.0) == {}
    assert select_heads_to_prune(importance, 0.25) == {0: [1], 1: [3]}
    assert select_heads_to_prune(importance, 0.5) == {0: [1], 1: [0, 1, 3]}
    # Everything but the single most important head of the model, unless asked.
    assert select_heads_to_prune(importance, 1.0) == {0: [0, 1, 2, 3], 1: [0, 1, 3]}
    assert select_heads_to_prune(importance, 1.0, allow_remove_all=True) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert select_heads_to_prune(importance, 0.75, min_heads_per_layer=2) == {0: [1, 3], 1: [0, 3]}
    with pytest.raises(ValueError, match="fraction"):
        select_heads_to_prune(importance, 1.5)


def test_select_heads_counts_already_pruned_heads():
    importance = torch.tensor([[0.0, 0.1, 0.8, 0.7], [0.2, 0.3, 0.95, 0.05]])  # head 0,0 already gone, scores 0
    already = {0: [0]}
    assert select_heads_to_prune(importance, 0.25, already_pruned=already) == {0: [0], 1: [3]}
    assert select_heads_to_prune(importance, 0.125, already_pruned=already) == {0: [0]}
    assert select_heads_to_prune(importance, 0.0, already_pruned=already) == {0: [0]}  # cannot grow back


def test_select_heads_whole_groups_for_gqa():
    model = build_model("llama")
    importance = compute_head_importance(model, make_batches("llama"), progress=False)
    selected = select_heads_to_prune(importance, 0.5, model=model)
    assert sum(len(v) for v in selected.values()) == 6
    for heads in selected.values():
        assert all(h // 2 * 2 in heads and h // 2 * 2 + 1 in heads for h in heads)
    prune_heads(model, selected)  # whole groups: no ValueError
    more = compute_head_importance(model, make_batches("llama"), progress=False)
    selected_more = select_heads_to_prune(more, 2 / 3, model=model)
    assert all(set(selected.get(k, [])) <= set(v) for k, v in selected_more.items())
    prune_heads(model, selected_more)
    assert sum(structure_summary(model)["heads_per_layer"]) == 4


def test_select_neurons():
    importance = {0: torch.tensor([0.5, 0.1, 0.4, 0.3]), 1: torch.tensor([0.05, 0.6, 0.2, 0.7])}
    assert select_neurons_to_prune(importance, 0.5) == {0: [1, 3], 1: [0, 2]}
    assert select_neurons_to_prune(importance, 0.5, already_pruned={1: [3]}) == {0: [1], 1: [0, 2, 3]}
    assert select_neurons_to_prune(importance, 1.0) == {0: [0, 1, 2, 3], 1: [0, 1, 2]}
    assert select_neurons_to_prune(importance, 1.0, min_neurons_per_layer=1) == {0: [1, 2, 3], 1: [0, 1, 2]}


@pytest.mark.parametrize("arch", ARCHS)
def test_score_select_prune_end_to_end(arch):
    model = build_model(arch)
    batches = make_batches(arch)
    heads = select_heads_to_prune(compute_head_importance(model, batches, progress=False), 0.5, model=model)
    neurons = select_neurons_to_prune(compute_neuron_importance(model, batches, progress=False), 0.5, model=model)
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    summary = structure_summary(model)
    assert sum(summary["heads_per_layer"]) == HEADS[arch]
    assert sum(summary["intermediate_sizes"]) == INTERMEDIATE[arch]
    assert summary["parameters"] < before
    with torch.no_grad():
        model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_taylor_equals_gradient_on_single_examples(arch):
    """The gate gradient of a unit is the sum of W * dL/dW over its columns: with one example per batch the two
    criteria coincide; with more, |sum| <= sum of |.|, so Taylor never exceeds the per-example gradient score."""
    model = build_model(arch).to(torch.float64)
    single = make_batches(arch, n=2, batch_size=1)
    gradient = compute_head_importance(model, single, normalize_layers=False, progress=False)
    taylor = compute_head_importance(model, single, normalize_layers=False, method="taylor", progress=False)
    torch.testing.assert_close(taylor, gradient, rtol=1e-6, atol=1e-12)
    batched = make_batches(arch, n=2, batch_size=4)
    gradient = compute_neuron_importance(model, batched, normalize_layers=False, progress=False)
    taylor = compute_neuron_importance(model, batched, normalize_layers=False, method="taylor", progress=False)
    for layer in gradient:
        # (the LM loss is computed in float32, so allow float32 rounding relative to the layer's largest score)
        assert bool((taylor[layer] <= gradient[layer] + 1e-5 * gradient[layer].max()).all())
        assert float(taylor[layer].sum()) < float(gradient[layer].sum())  # cancellations across examples
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_a_registered_unit_criterion_is_used_by_name():
    from hf_prune import available_unit_criteria, register_unit_criterion
    from hf_prune.units import UnitCriterion, unregister_unit_criterion

    class FirstUnitsFirst(UnitCriterion):
        """Scores unit i of every layer as total - i: a ranking no data-driven criterion would give."""

        def run_batch(self, model, batch, live, state, totals):
            for slot in live:
                totals[slot.layer_idx][slot.kept] += torch.tensor(
                    [float(slot.total - u) for u in slot.kept], device=totals[0].device
                )

    register_unit_criterion("first_units_first", FirstUnitsFirst)
    try:
        assert "first_units_first" in available_unit_criteria()
        model = build_model("bert")
        scores = compute_head_importance(model, make_batches("bert"), normalize_layers=False,
                                         method="first_units_first", progress=False)
        torch.testing.assert_close(scores, torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 2))
        with pytest.raises(ValueError, match="method='nope'.*first_units_first"):
            compute_head_importance(model, make_batches("bert"), method="nope", progress=False)
    finally:
        unregister_unit_criterion("first_units_first")
