"""hf_prune.allocation and hf_prune.owl: per-module sparsity that meets the global target exactly, prunes sensitive
modules less, respects its bounds and reproduces through the real engine; per-layer head/neuron budgets honoured by
the selection."""

from __future__ import annotations

import re

import pytest
import torch

from hf_prune import (
    PruningConfig,
    Pruner,
    allocate_sparsity,
    allocate_units,
    analyze_sensitivity,
    owl_sparsity,
    plan_sparsities,
    select_heads_to_prune,
    select_neurons_to_prune,
)
from hf_prune.allocation import make_curve, module_name, module_pattern, sparsity_within
from hf_prune.masks import find_target_modules

from conftest import build_model, make_batches


def synthetic(curves, sizes, higher_is_better=False, kind="linear"):
    """A sensitivity result from {group: {level: delta}} and {group: weights}, one module per group."""
    rows = [{"group": g, "kind": kind, "layer": i, "level": level, "metric": delta, "delta": delta,
             "params": sizes[g]} for i, (g, points) in enumerate(curves.items()) for level, delta in points.items()]
    groups = {g: {"kind": kind, "layer": i, "modules": {g: sizes[g]}, "params": sizes[g]}
              for i, g in enumerate(curves)}
    return {"rows": rows, "baseline": 0.0, "higher_is_better": higher_is_better, "groups": groups}


def weighted(plan, sizes):
    return sum(plan[n] * sizes[n] for n in plan) / sum(sizes[n] for n in plan)


SIZES = {"a": 1000, "b": 3000, "c": 517}
CURVES = {
    "a": {0.3: 0.5, 0.5: 2.0, 0.7: 5.0, 0.9: 9.0},   # fragile
    "b": {0.3: 0.0, 0.5: 0.01, 0.7: 0.05, 0.9: 0.2},  # robust
    "c": {0.3: 0.1, 0.5: 0.2, 0.7: 0.6, 0.9: 1.5},
}


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7, 0.8123, 0.9, 0.95])
def test_the_target_is_met_exactly_and_sensitive_modules_get_less(target):
    overrides = allocate_sparsity(synthetic(CURVES, SIZES), target, max_sparsity=0.95)
    plan = plan_sparsities(overrides)
    assert set(plan) == set(SIZES)
    assert weighted(plan, SIZES) == pytest.approx(target, abs=1e-9)
    counts = {n: round(plan[n] * SIZES[n]) for n in plan}  # what the engine prunes per module
    assert sum(counts.values()) == round(target * sum(SIZES.values()))
    assert all(-1e-12 <= plan[n] <= 0.95 + 1e-12 for n in plan)
    if 0.0 < target < 0.95:
        assert plan["a"] <= plan["c"] <= plan["b"] and plan["a"] < plan["b"]


def test_the_metric_direction_is_respected():
    # Accuracy falls (negative delta) where loss would rise: the same allocation either way.
    flipped = {g: {level: -delta for level, delta in points.items()} for g, points in CURVES.items()}
    by_loss = allocate_sparsity(synthetic(CURVES, SIZES), 0.6)
    by_accuracy = allocate_sparsity(synthetic(flipped, SIZES, higher_is_better=True), 0.6)
    assert by_loss == pytest.approx(by_accuracy)


def test_bounds_are_respected_and_flat_curves_share_the_budget():
    plan = plan_sparsities(allocate_sparsity(synthetic(CURVES, SIZES), 0.5, min_sparsity=0.2, max_sparsity=0.6))
    assert all(0.2 - 1e-12 <= v <= 0.6 + 1e-12 for v in plan.values())
    assert weighted(plan, SIZES) == pytest.approx(0.5, abs=1e-9)
    flat = {g: {0.5: 0.0, 0.9: 0.0} for g in SIZES}  # nothing is sensitive: every module gets the target
    plan = plan_sparsities(allocate_sparsity(synthetic(flat, SIZES), 0.7))
    assert all(v == pytest.approx(0.7, abs=1e-3) for v in plan.values())


@pytest.mark.parametrize("kwargs, message", [
    ({"target_sparsity": 0.95, "max_sparsity": 0.9}, r"target_sparsity=0.95 is invalid: .* \[0.0, 0.9\]"),
    ({"target_sparsity": 0.1, "min_sparsity": 0.2}, r"target_sparsity=0.1 is invalid: .* \[0.2, 0.99\]"),
    ({"target_sparsity": 0.5, "min_sparsity": 0.7, "max_sparsity": 0.6}, r"min_sparsity=0.7 is invalid: must not "
                                                                          r"exceed max_sparsity=0.6"),
    ({"target_sparsity": 0.5, "max_sparsity": 1.0}, r"max_sparsity=1.0 is invalid: must lie in \(0, 1\)"),
    ({"target_sparsity": 0.5, "min_sparsity": -0.1}, r"min_sparsity=-0.1 is invalid: must lie in \[0, 1\)"),
    ({"target_sparsity": 0.5, "kind": "heads"}, r"kind='heads' is invalid: choose one of \['linear', 'layer'\]"),
])
def test_infeasible_bounds_raise_naming_the_option_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate_sparsity(synthetic(CURVES, SIZES), **kwargs)


def test_patterns_are_anchored_and_escaped():
    assert module_name(module_pattern("model.layers.1.mlp.down_proj")) == "model.layers.1.mlp.down_proj"
    pattern = module_pattern("encoder.layer.1.output.dense")
    assert re.search(pattern, "encoder.layer.1.output.dense")
    assert not re.search(pattern, "encoder.layer.11.output.dense")
    assert not re.search(pattern, "encoder.layer.1.output.dense.extra")
    assert not re.search(pattern, "encoder.layerX1.output.dense")
    assert module_name("layer\\.1") is None
    with pytest.raises(ValueError, match="not a single-module pattern"):
        plan_sparsities({"layer": 0.5})


def test_curves_are_monotone_and_extended():
    curve = make_curve([(0.5, 1.0), (0.3, 2.0), (0.9, 3.0)])  # noise: 0.5 looks better than 0.3
    assert curve == ([0.0, 0.3, 0.5, 0.9], [0.0, 2.0, 2.0, 3.0])
    assert sparsity_within(curve, 1.0) == pytest.approx(0.15)
    assert sparsity_within(curve, 3.5) == pytest.approx(0.9 + 0.5 / 2.5)  # the last slope, extended
    assert sparsity_within(curve, -1.0) == float("-inf")


# ------------------------------------------------------------------------------------------------ the real engine
def run_engine(model, config, steps=4):
    """A few real training steps with the engine: cubic schedule over all steps, masks updated every step."""
    pruner = Pruner(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner.attach_optimizer(optimizer)
    pruner.start(steps)
    batch = make_batches("bert", n=1, batch_size=4)[0]
    model.train()
    for step in range(1, steps + 1):
        model(**batch).loss.backward()
        pruner.before_optimizer_step()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
        pruner.update(step)
    return pruner


def engine_config(target, overrides):
    return PruningConfig(target_sparsity=target, sparsity_overrides=overrides, schedule="cubic",
                         warmup_fraction=0.0, cooldown_fraction=0.0, pruning_interval=1)


@pytest.mark.parametrize("kind", ["linear", "layer"])
def test_the_overrides_reproduce_the_plan_through_a_real_pruner(kind):
    model = build_model("bert")
    result = analyze_sensitivity(model, make_batches("bert", n=2), groups=["linear", "layer"], progress=False)
    target = 0.7  # 0.7 * 16384 targeted weights is not a whole number: the remainder is spread, not lost
    overrides = allocate_sparsity(result, target, kind=kind)
    plan = plan_sparsities(overrides)
    sizes = {n: m.weight.numel() for n, m in find_target_modules(model).items()}
    assert set(plan) == set(sizes)
    assert weighted(plan, sizes) == pytest.approx(target, abs=1e-9)
    assert len(set(round(v, 6) for v in plan.values())) > 1  # not uniform: the curves differ
    pruner = run_engine(model, engine_config(target, overrides))
    for name, module in pruner.modules.items():
        assert pruner.override_of[name] == plan[name]
        zeros = int((module.weight == 0).sum())
        assert zeros == int(pruner.masks[name].sum()) == round(plan[name] * sizes[name]), name
    total = sum(sizes.values())
    assert pruner.measured_sparsity() == round(target * total) / total
    assert abs(pruner.measured_sparsity() - target) <= 0.5 / total
    if kind == "layer":
        for layer in (0, 1):
            values = [v for n, v in plan.items() if f"layer.{layer}." in n]
            assert max(values) - min(values) <= 1 / 1024 + 1e-9  # one sparsity per layer, within a weight


# ------------------------------------------------------------------------------------------------ OWL
@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
def test_owl_mean_equals_the_target_exactly(target):
    model = build_model("bert")
    overrides, ratios = owl_sparsity(model, make_batches("bert", n=2), target, return_ratios=True, progress=False)
    plan = plan_sparsities(overrides)
    sizes = {n: m.weight.numel() for n, m in find_target_modules(model).items()}
    assert weighted(plan, sizes) == pytest.approx(target, abs=1e-9)
    assert set(ratios) == {"bert.encoder.layer.0", "bert.encoder.layer.1"}
    assert max(plan.values()) - min(plan.values()) <= 2 * 0.08 + 1e-3
    pruner = run_engine(model, engine_config(target, overrides))
    total = sum(sizes.values())
    assert pruner.measured_sparsity() == round(target * total) / total


def test_owl_prunes_the_layer_with_outliers_less_and_lambda_zero_is_uniform():
    model = build_model("bert")
    with torch.no_grad():  # plant outliers in layer 1: a few weights 50x larger
        model.bert.encoder.layer[1].intermediate.dense.weight[:, :2] *= 50
    batches = make_batches("bert", n=2)
    overrides, ratios = owl_sparsity(model, batches, 0.6, return_ratios=True, progress=False)
    plan = plan_sparsities(overrides)
    assert ratios["bert.encoder.layer.1"] > ratios["bert.encoder.layer.0"]
    layer0 = plan["bert.encoder.layer.0.output.dense"]
    layer1 = plan["bert.encoder.layer.1.output.dense"]
    assert layer1 < 0.6 < layer0 and layer0 - layer1 == pytest.approx(2 * 0.08, abs=1e-3)
    uniform = plan_sparsities(owl_sparsity(model, batches, 0.6, lambda_=0.0, progress=False))
    assert all(v == pytest.approx(0.6, abs=1e-3) for v in uniform.values())


def test_owl_bounds_clip_and_keep_the_mean():
    model = build_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[:, :2] *= 50
    plan = plan_sparsities(owl_sparsity(model, make_batches("bert"), 0.95, lambda_=0.2, max_sparsity=0.97,
                                        progress=False))
    sizes = {n: m.weight.numel() for n, m in find_target_modules(model).items()}
    assert max(plan.values()) <= 0.97 + 1e-12
    assert weighted(plan, sizes) == pytest.approx(0.95, abs=1e-9)
    with pytest.raises(ValueError, match=r"owl_sparsity: target_sparsity=0.98 is invalid: .*\[0.0, 0.97\]"):
        owl_sparsity(model, make_batches("bert"), 0.98, max_sparsity=0.97, progress=False)
    with pytest.raises(ValueError, match="threshold_m=0 is invalid"):
        owl_sparsity(model, make_batches("bert"), 0.5, threshold_m=0, progress=False)


# ------------------------------------------------------------------------------------------------ unit budgets
def test_allocate_units_meets_the_fraction_and_spares_the_sensitive_layer():
    curves = {"l0:heads": {0.25: 0.0, 0.5: 0.01, 1.0: 0.1}, "l1:heads": {0.25: 1.0, 0.5: 3.0, 1.0: 9.0}}
    data = synthetic(curves, {g: 4096 for g in curves}, kind="heads")
    for i, g in enumerate(curves):
        data["groups"][g].update({"units": 8, "group_size": 1, "modules": {}})
    budget = allocate_units(data, 0.5)
    assert sum(budget.values()) == 8 and budget[0] > budget[1]
    with pytest.raises(ValueError, match=r"fraction=1.5 is invalid"):
        allocate_units(data, 1.5)
    with pytest.raises(ValueError, match=r"kind='linear' is invalid"):
        allocate_units(data, 0.5, kind="linear")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_select_heads_honours_a_per_layer_budget(arch):
    model = build_model(arch)
    result = analyze_sensitivity(model, make_batches(arch, n=1), groups=["heads"], levels=(0.5, 1.0),
                                 unit_importance="activation", progress=False)
    budget = allocate_units(result, 0.5)
    heads = {"bert": 4, "llama": 6}[arch]
    size = {"bert": 1, "llama": 2}[arch]
    assert sum(budget.values()) == heads and all(count % size == 0 for count in budget.values())
    importance = torch.rand(2, heads, generator=torch.Generator().manual_seed(0))
    chosen = select_heads_to_prune(importance, 0.5, model=model, layer_budget=budget)
    assert {layer: len(chosen.get(layer, [])) for layer in budget} == budget
    for layer, heads_gone in chosen.items():  # the lowest-importance heads (groups) of each layer
        groups = importance[layer].view(-1, size).sum(-1)
        assert sorted({h // size for h in heads_gone}) == sorted(groups.argsort()[: len(heads_gone) // size].tolist())
    # The budget alone (no fraction) gives the same; without a budget the global selection is unchanged.
    assert select_heads_to_prune(importance, model=model, layer_budget=budget) == chosen
    plain = select_heads_to_prune(importance, 0.5, model=model)
    assert sum(len(v) for v in plain.values()) == heads


def test_budget_checks_and_already_removed_heads():
    importance = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    assert select_heads_to_prune(importance, layer_budget={0: 1, 1: 3}) == {0: [0], 1: [1, 2, 3]}
    # Already removed heads count towards their layer's budget and stay removed.
    assert select_heads_to_prune(importance, layer_budget={0: 2}, already_pruned={0: [3], 1: [0]}) == {
        0: [0, 3], 1: [0]}
    with pytest.raises(ValueError, match="layer_budget removes 4 heads but fraction=0.25"):
        select_heads_to_prune(importance, 0.25, layer_budget={0: 2, 1: 2})
    with pytest.raises(ValueError, match=r"layer_budget\[0\]=5 is invalid"):
        select_heads_to_prune(importance, layer_budget={0: 5})
    with pytest.raises(ValueError, match=r"layer_budget names layer\(s\) \[7\]"):
        select_heads_to_prune(importance, layer_budget={7: 1})
    with pytest.raises(ValueError, match=r"layer_budget\[0\]=1 is invalid: heads go in groups of 2"):
        select_heads_to_prune(importance, layer_budget={0: 1}, group_size=2)
    with pytest.raises(ValueError, match="removes all 8 heads"):
        select_heads_to_prune(importance, layer_budget={0: 4, 1: 4})
    with pytest.raises(ValueError, match="give the fraction of heads to prune, or a per-layer layer_budget"):
        select_heads_to_prune(importance)
    neurons = {0: torch.tensor([0.5, 0.1, 0.9]), 1: torch.tensor([0.3, 0.2, 0.1])}
    assert select_neurons_to_prune(neurons, layer_budget={0: 2}) == {0: [0, 1]}
