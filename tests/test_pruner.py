"""The Pruner engine on a tiny BERT, without a Trainer: sparsity targets, masks under AdamW and autocast,
movement scores, state round trips, soft movement, and make_permanent."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from transformers import BertForSequenceClassification

from conftest import tiny_bert

from hf_prune.config import PruningConfig
from hf_prune.finalize import make_permanent
from hf_prune.pruner import STATE_NAME, Pruner


def batch(seed: int = 0, size: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (size, length), generator=generator),
        "labels": torch.randint(0, 2, (size,), generator=generator),
    }


def zeros_of(module: nn.Module) -> int:
    return int((module.weight == 0).sum())


# ------------------------------------------------------------------------------------------------ prune_to
def test_global_scope_hits_target_and_ranks_globally():
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(target_sparsity=0.7, scope="global"))
    original = {n: m.weight.detach().abs().clone() for n, m in pruner.modules.items()}
    pruner.prune_to(0.7)
    zeros = sum(zeros_of(m) for m in pruner.modules.values())
    total = sum(m.weight.numel() for m in pruner.modules.values())
    assert abs(zeros / total - 0.7) <= 1e-3
    assert pruner.measured_sparsity() == pytest.approx(zeros / total)
    # One threshold across all modules: every pruned weight was smaller than every kept weight.
    pruned = torch.cat([original[n][m.weight == 0] for n, m in pruner.modules.items()])
    kept = torch.cat([original[n][m.weight != 0] for n, m in pruner.modules.items()])
    assert pruned.max() <= kept.min()
    # Layers outside the targets stay dense.
    assert zeros_of(model.classifier) == 0 and zeros_of(model.bert.pooler.dense) == 0


def test_local_scope_hits_target_per_module():
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(target_sparsity=0.6, scope="local"))
    pruner.prune_to(0.6)
    for name, module in pruner.modules.items():
        assert abs(zeros_of(module) / module.weight.numel() - 0.6) <= 1e-3, name


def _override_sparsities(pruner: Pruner) -> tuple[list[float], float]:
    override, others_zeros, others_total = [], 0, 0
    for name, module in pruner.modules.items():
        if name in pruner.override_of:
            override.append(zeros_of(module) / module.weight.numel())
        else:
            others_zeros += zeros_of(module)
            others_total += module.weight.numel()
    return override, others_zeros / others_total


def test_sparsity_overrides_get_their_own_sparsity():
    model = tiny_bert(num_labels=2)
    config = PruningConfig(target_sparsity=0.8, sparsity_overrides={r"intermediate\.dense": 0.3})
    pruner = Pruner(model, config)
    assert set(pruner.override_of) == {f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)}
    # Halfway along the schedule, the overridden modules are halfway to their own target.
    pruner.prune_to(0.4)
    override, others = _override_sparsities(pruner)
    assert len(override) == 2 and all(abs(s - 0.15) <= 1e-3 for s in override)
    assert abs(others - 0.4) <= 1e-3
    pruner.prune_to(0.8)
    override, others = _override_sparsities(pruner)
    assert all(abs(s - 0.3) <= 1e-3 for s in override)
    assert abs(others - 0.8) <= 1e-3


@pytest.mark.parametrize("targets", [[r"no_such_module"], [r"encoder\.layer\.\d+\.", r"no_such_module"]])
def test_targets_matching_nothing_raise(targets):
    with pytest.raises(ValueError, match="targets") as info:
        Pruner(tiny_bert(num_labels=2), PruningConfig(targets=targets))
    assert "no_such_module" in str(info.value)


def test_override_matching_nothing_raises():
    with pytest.raises(ValueError, match="sparsity_overrides"):
        Pruner(tiny_bert(num_labels=2), PruningConfig(sparsity_overrides={"no_such_module": 0.5}))


def test_update_follows_schedule():
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(target_sparsity=0.5, warmup_fraction=0.1, cooldown_fraction=0.3,
                                         pruning_interval=2))
    with pytest.raises(RuntimeError):
        pruner.update(1)
    pruner.start(total_steps=20)  # steps 2..14
    assert not pruner.update(1)
    assert pruner.measured_sparsity() == 0.0
    assert pruner.update(2)
    assert pruner.measured_sparsity() == 0.0  # initial_sparsity at the start step
    assert not pruner.update(3)
    assert pruner.update(8)
    assert pruner.measured_sparsity() == pytest.approx(0.5 * (1 - 0.5**3), abs=1e-3)
    assert pruner.update(14)
    assert pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)
    assert pruner.last_update_step == 14


def test_masks_are_monotone():
    # A weight pruned once stays pruned, even if its score later rises above the kept ones.
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(method="movement", target_sparsity=0.6))
    for name, module in pruner.modules.items():
        pruner.scores[name].copy_(torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(1)))
    pruner.prune_to(0.3)
    first = {n: m.clone() for n, m in pruner.masks.items()}
    for name in pruner.modules:
        pruner.scores[name].masked_fill_(first[name], 10.0)
    pruner.prune_to(0.6)
    for name in pruner.modules:
        assert bool(pruner.masks[name][first[name]].all()), name
    assert pruner.measured_sparsity() == pytest.approx(0.6, abs=1e-3)


def test_mask_update_clears_adam_state_of_pruned_weights():
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(target_sparsity=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach_optimizer(optimizer)
    model(**batch(0)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    pruner.prune_to(0.5)
    for name, module in pruner.modules.items():
        state = optimizer.state[module.weight]
        mask = pruner.masks[name]
        for key in ("exp_avg", "exp_avg_sq"):
            assert bool((state[key][mask] == 0).all()), (name, key)
            assert bool((state[key][~mask] != 0).any()), (name, key)


# ------------------------------------------------------------------------------------------ training loop
def _train_with_masks(autocast: bool) -> None:
    model = tiny_bert(num_labels=2)
    model.train()
    pruner = Pruner(model, PruningConfig(target_sparsity=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)

    def step(seed: int) -> None:
        data = batch(seed)
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**data).loss
        else:
            loss = model(**data).loss
        loss.backward()
        pruner.before_optimizer_step()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()

    # Two dense steps first, so Adam's moments would move freshly pruned weights if nothing held them at zero.
    for seed in range(2):
        step(seed)
    pruner.prune_to(0.5)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    before = {n: m.weight.detach().clone() for n, m in pruner.modules.items()}
    for seed in range(2, 12):
        step(seed)
        for name, module in pruner.modules.items():
            assert module.weight.dtype == torch.float32
            assert bool((module.weight[masks[name]] == 0).all()), f"{name} at step {seed}"
    assert pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)
    # The kept weights did train.
    name = "bert.encoder.layer.0.attention.self.query"
    kept = ~masks[name]
    assert not torch.equal(pruner.modules[name].weight.detach()[kept], before[name][kept])


def test_masks_hold_under_adamw():
    _train_with_masks(autocast=False)


def test_masks_hold_under_bf16_autocast():
    _train_with_masks(autocast=True)


def test_without_after_optimizer_step_adam_revives_pruned_weights():
    # The control for the two tests above: Adam's moments do move zeroed weights.
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(target_sparsity=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in range(2):
        model(**batch(seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pruner.prune_to(0.5)
    model(**batch(2)).loss.backward()
    pruner.before_optimizer_step()
    optimizer.step()
    assert pruner.measured_sparsity() < 0.4


# ---------------------------------------------------------------------------------------------- movement
def test_movement_scores_accumulate_minus_w_times_grad():
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(method="movement", target_sparsity=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {n: torch.zeros_like(m.weight) for n, m in pruner.modules.items()}
    for seed in range(3):
        model(**batch(seed)).loss.backward()
        for name, module in pruner.modules.items():
            expected[name] -= module.weight.detach() * module.weight.grad
        pruner.before_optimizer_step()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
    for name in pruner.modules:
        assert expected[name].abs().sum() > 0
        torch.testing.assert_close(pruner.scores[name], expected[name], rtol=1e-5, atol=1e-10)
    # Masks follow the movement scores, not the magnitudes.
    pruner.prune_to(0.5)
    name = "bert.encoder.layer.1.output.dense"
    mask = pruner.masks[name]
    assert expected[name][mask].max() <= expected[name][~mask].min()


# ------------------------------------------------------------------------------------------------- state
def _pruned_movement_pair():
    model = tiny_bert(num_labels=2)
    dense_copy = copy.deepcopy(model)
    pruner = Pruner(model, PruningConfig(method="movement", target_sparsity=0.6))
    model(**batch(0)).loss.backward()
    pruner.before_optimizer_step()
    pruner.prune_to(0.6)
    pruner.last_update_step = 42
    return model, dense_copy, pruner


def _assert_same_state(source: Pruner, fresh: Pruner, dense_model: nn.Module) -> None:
    assert set(fresh.masks) == set(source.masks)
    for name, module in fresh.modules.items():
        assert torch.equal(fresh.masks[name], source.masks[name]), name
        assert torch.equal(fresh.scores[name], source.scores[name]), name
        assert bool((module.weight[fresh.masks[name]] == 0).all()), name
    assert fresh.last_update_step == 42
    assert fresh.scheduled_sparsity == pytest.approx(0.6)
    assert fresh.measured_sparsity() == pytest.approx(source.measured_sparsity())
    # Weights outside the masks are untouched: the copy keeps its own values.
    name = "bert.encoder.layer.0.attention.self.query"
    kept = ~fresh.masks[name]
    original = dict(dense_model.named_modules())[name].weight
    assert torch.equal(fresh.modules[name].weight[kept], original[kept])


def test_state_dict_round_trip_into_fresh_pruner():
    model, dense_copy, pruner = _pruned_movement_pair()
    fresh = Pruner(dense_copy, PruningConfig(method="movement", target_sparsity=0.6))
    assert fresh.measured_sparsity() == 0.0
    reference = copy.deepcopy(dense_copy)
    fresh.load_state_dict(pruner.state_dict())
    _assert_same_state(pruner, fresh, reference)


def test_load_state_dict_rejects_foreign_masks():
    _, dense_copy, pruner = _pruned_movement_pair()
    state = pruner.state_dict()
    state["masks"]["bert.pooler.dense"] = torch.zeros(32, 32, dtype=torch.bool)
    fresh = Pruner(dense_copy, PruningConfig(method="movement", target_sparsity=0.6))
    with pytest.raises(ValueError, match="bert.pooler.dense"):
        fresh.load_state_dict(state)


def test_save_load_round_trip(tmp_path):
    _, dense_copy, pruner = _pruned_movement_pair()
    path = pruner.save(str(tmp_path))
    assert path == os.path.join(str(tmp_path), STATE_NAME) and os.path.isfile(path)
    assert os.listdir(tmp_path) == [STATE_NAME]
    reference = copy.deepcopy(dense_copy)
    fresh = Pruner(dense_copy, PruningConfig(method="movement", target_sparsity=0.6))
    fresh.load(str(tmp_path))
    _assert_same_state(pruner, fresh, reference)


# ------------------------------------------------------------------------------------------ soft movement
def test_soft_movement_scores_and_regularization():
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(method="soft_movement", target_sparsity=0.5))
    params = pruner.score_parameters()
    assert len(params) == len(pruner.modules) == 12
    for param, module in zip(params, pruner.modules.values()):
        assert isinstance(param, nn.Parameter) and param.requires_grad
        assert param.shape == module.weight.shape
    reg = pruner.regularization()
    assert reg.dim() == 0 and reg.requires_grad
    expected = sum(torch.sigmoid(p.detach()).sum() for p in params) / pruner.num_targeted
    assert reg.item() == pytest.approx(expected.item(), rel=1e-6)
    reg.backward()
    for param in params:
        assert param.grad is not None and bool((param.grad > 0).all())
    # The regulariser's gradient is d mean(sigmoid(s)) / ds = sigmoid'(s) / N.
    s = params[0].detach()
    torch.testing.assert_close(params[0].grad, torch.sigmoid(s) * (1 - torch.sigmoid(s)) / pruner.num_targeted)


def test_soft_movement_score_gradient_from_training_step():
    model = tiny_bert(num_labels=2)
    pruner = Pruner(model, PruningConfig(method="soft_movement", target_sparsity=0.5, regularization_lambda=3.0))
    model(**batch(0)).loss.backward()
    pruner.before_optimizer_step()
    name, module = next(iter(pruner.modules.items()))
    score = pruner.scores[name]
    # Straight-through gradient W * dL/dW plus the regulariser's lambda * sigmoid'(S) / N in closed form.
    sig = torch.sigmoid(score.detach())
    expected = module.weight.detach() * module.weight.grad + 3.0 * sig * (1 - sig) / pruner.num_targeted
    torch.testing.assert_close(score.grad, expected)
    # The closed form is the autograd gradient of the loss term, whose value the trainer logs.
    reference = score.detach().clone().requires_grad_(True)
    scores = [reference if p is score else p.detach() for p in pruner.score_parameters()]
    term = 3.0 * torch.stack([torch.sigmoid(s).sum() for s in scores]).sum() / pruner.num_targeted
    (autograd,) = torch.autograd.grad(term, reference)
    torch.testing.assert_close(score.grad - module.weight.detach() * module.weight.grad, autograd)
    assert pruner.loss().item() == pytest.approx(term.item(), rel=1e-6)
    assert Pruner(tiny_bert(num_labels=2), PruningConfig(method="magnitude")).score_parameters() == []


# ------------------------------------------------------------------------------------------ make_permanent
class _MaskParametrization(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.masked_fill(self.mask, 0.0)


def test_make_permanent_removes_wrappers(tmp_path):
    model = tiny_bert(num_labels=2).eval()
    plain_keys = set(model.state_dict())
    inputs = batch(0)["input_ids"]
    query = model.bert.encoder.layer[0].attention.self.query
    ffn = model.bert.encoder.layer[1].intermediate.dense
    torch_prune.l1_unstructured(query, name="weight", amount=0.5)
    ffn_mask = torch.rand(ffn.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    parametrize.register_parametrization(ffn, "weight", _MaskParametrization(ffn_mask))
    wrapped_keys = set(model.state_dict())
    assert any(k.endswith("weight_orig") for k in wrapped_keys)
    assert any(k.endswith("weight_mask") for k in wrapped_keys)
    assert any("parametrizations" in k for k in wrapped_keys)
    query_mask = query.weight_mask.detach().clone() == 0
    with torch.no_grad():
        expected = model(input_ids=inputs).logits

    assert make_permanent(model) is model
    state = model.state_dict()
    assert set(state) == plain_keys
    assert not parametrize.is_parametrized(ffn)
    assert not any(isinstance(h, torch_prune.BasePruningMethod) for h in query._forward_pre_hooks.values())
    assert isinstance(query.weight, nn.Parameter) and isinstance(ffn.weight, nn.Parameter)
    assert int(query_mask.sum()) == 512
    assert bool((state["bert.encoder.layer.0.attention.self.query.weight"][query_mask] == 0).all())
    assert bool((state["bert.encoder.layer.1.intermediate.dense.weight"][ffn_mask] == 0).all())
    assert bool((state["bert.encoder.layer.1.intermediate.dense.weight"][~ffn_mask] != 0).all())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=inputs).logits, expected, rtol=0, atol=0)

    # The plain state dict reloads with from_pretrained and gives the same logits.
    model.save_pretrained(str(tmp_path))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, expected, rtol=0, atol=0)
