"""method="obs" (the Optimal BERT Surgeon): its saliency and weight update against exact second-order answers, the
block inverses against torch.linalg.inv, and the method in the real Trainer (every pattern, the plain callback,
resume from a checkpoint)."""

from __future__ import annotations

import re
from typing import Optional

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.pytorch_utils import Conv1D

from conftest import random_classification_data, tiny_bert, training_args
from hf_prune import PruningCallback, PruningConfig, PruningTrainer
from hf_prune.methods import obs
from hf_prune.methods.obs import ObsMethod
from hf_prune.pruner import STATE_NAME, Pruner

SCHEDULE = dict(warmup_fraction=0.1, cooldown_fraction=0.2, pruning_interval=2)  # 20 steps: updates at 2, 4, ..., 16


def attached(module: nn.Module, **options) -> ObsMethod:
    method = ObsMethod(PruningConfig(method="obs", **options))
    method.attach({"layer": module})
    return method


def feed(method: ObsMethod, module: nn.Module, grads) -> None:
    for grad in grads:
        method.on_gradients(["layer"], [module.weight.detach()], [grad.reshape(module.weight.shape).float()])


# ------------------------------------------------------------------------------------------------ the mathematics
def least_squares(n: int = 64, d: int = 8, seed: int = 0, zero: Optional[int] = None):
    """A least-squares problem L(w) = mean (x.w - y)^2 / 2 at its minimum w* (with w*[zero] = 0 if given), built so
    that every residual is +-1: the per-sample gradients r_n x_n then have an empirical Fisher (1/n) sum x x^T equal
    to the Hessian exactly."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=generator, dtype=torch.float64)
    features = features @ torch.randn(d, d, generator=generator, dtype=torch.float64)  # correlated inputs
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    x = features - torch.outer(signs, signs @ features) / n  # x^T signs = 0, so w* below is the minimum
    w_star = torch.randn(d, generator=generator, dtype=torch.float64)
    if zero is not None:
        w_star[zero] = 0.0
    y = x @ w_star - signs  # residuals x.w* - y = signs

    def loss(w: torch.Tensor) -> float:
        return float(0.5 * ((x @ w.double() - y) ** 2).mean())

    return x, y, w_star, signs, loss


def obs_on_least_squares(w_star, x, signs, **options) -> tuple[nn.Linear, ObsMethod]:
    layer = nn.Linear(x.shape[1], 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w_star.float().unsqueeze(0))
    method = attached(layer, obs_block_size=x.shape[1], obs_num_gradients=x.shape[0], obs_damp=1e-6, **options)
    feed(method, layer, [s * row for s, row in zip(signs, x)])
    return layer, method


def test_saliency_is_the_loss_increase_and_the_update_beats_zeroing():
    x, _, w_star, signs, loss = least_squares()
    layer, method = obs_on_least_squares(w_star, x, signs)
    hessian = x.T @ x / x.shape[0]
    # rho_i = w_i^2 / (2 [H^-1]_ii): the loss increase of removing w_i with the others moved optimally.
    expected = w_star ** 2 / (2 * torch.linalg.inv(hessian).diagonal())
    saliency = method.scores("layer", layer)[0].double()
    torch.testing.assert_close(saliency, expected, rtol=2e-3, atol=0)

    q = int(saliency.argmin())
    zeroed = w_star.clone()
    zeroed[q] = 0
    newly = torch.zeros(1, 8, dtype=torch.bool)
    newly[0, q] = True
    method.on_masks_updated("layer", layer, newly)
    updated = layer.weight.detach()[0]
    assert float(updated[q]) == 0.0  # exactly
    base = loss(w_star)
    increase_obs, increase_zeroed = loss(updated) - base, loss(zeroed) - base
    assert increase_obs < 0.5 * increase_zeroed, (increase_obs, increase_zeroed)
    assert increase_obs == pytest.approx(float(saliency[q]), rel=1e-2)  # what the saliency promised


def test_update_of_several_weights_is_the_constrained_optimum_and_keeps_earlier_zeros():
    x, y, w_star, signs, loss = least_squares(zero=2)  # w*_2 = 0: pruned at an earlier step, and training recovered
    layer, method = obs_on_least_squares(w_star, x, signs)
    newly = torch.zeros(1, 8, dtype=torch.bool)
    newly[0, [1, 4, 6]] = True
    method.on_masks_updated("layer", layer, newly)
    updated = layer.weight.detach()[0]
    pruned = newly[0].clone()
    pruned[2] = True
    assert bool((updated[pruned] == 0).all())
    # On a quadratic with its exact Hessian, OBS lands on the least-squares fit over the kept columns: the best the
    # kept weights can do.
    best = torch.zeros(8, dtype=torch.float64)
    best[~pruned] = torch.linalg.lstsq(x[:, ~pruned], y.unsqueeze(-1)).solution[:, 0]
    torch.testing.assert_close(updated.double(), best, rtol=0, atol=2e-3)
    assert loss(updated) == pytest.approx(loss(best), rel=1e-3)


@pytest.mark.parametrize("num_gradients", [3, 12])  # fewer (Woodbury) and more gradients than weights per block
def test_closed_form_block_inverses_equal_linalg_inv(num_gradients):
    generator = torch.Generator().manual_seed(1)
    layer = nn.Linear(5, 3)  # 15 weights: blocks of 8, the second one padded
    grads = [torch.randn(3, 5, generator=generator) * 1e-2 for _ in range(num_gradients)]
    damp = 0.1
    method = attached(layer, obs_block_size=8, obs_num_gradients=num_gradients, obs_damp=damp)
    feed(method, layer, grads)
    flat = torch.nn.functional.pad(torch.stack(grads).reshape(num_gradients, -1).double(), (0, 1))  # 16 = 2 blocks
    scaled, lam = method._scaled_gradients("layer", layer)
    assert lam == pytest.approx(damp * float(flat.square().sum()) / (num_gradients * 15))  # relative to mean g^2
    (rows, inverses), = list(method._inverses(scaled, None, 2))
    for block in range(2):
        g = flat[:, 8 * block:8 * block + 8]
        fisher = lam * torch.eye(8, dtype=torch.float64) + g.T @ g / num_gradients
        torch.testing.assert_close(inverses[block].double() / lam, torch.linalg.inv(fisher), rtol=1e-4, atol=0)
    # And the scores are w^2 / (2 [F^-1]_ii) with that inverse.
    diagonal = torch.cat([torch.linalg.inv(lam * torch.eye(8, dtype=torch.float64)
                                           + flat[:, 8 * b:8 * b + 8].T @ flat[:, 8 * b:8 * b + 8] / num_gradients
                                           ).diagonal() for b in range(2)])[:15]
    expected = layer.weight.detach().double().reshape(-1) ** 2 / (2 * diagonal)
    torch.testing.assert_close(method.scores("layer", layer).double().reshape(-1), expected, rtol=1e-4, atol=0)


def test_already_pruned_weights_are_left_out_of_the_fisher():
    generator = torch.Generator().manual_seed(2)
    layer = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight[0, :2] = 0.0
    grads = [torch.randn(1, 8, generator=generator) for _ in range(20)]
    method = attached(layer, obs_block_size=8, obs_num_gradients=20, obs_damp=0.05)
    feed(method, layer, grads)
    scaled, lam = method._scaled_gradients("layer", layer)
    (_, inverses), = list(method._inverses(scaled, None, 1))
    inverse = inverses[0]
    g = torch.stack(grads).reshape(20, 8).double()[:, 2:]
    kept_fisher = lam * torch.eye(6, dtype=torch.float64) + g.T @ g / 20
    # The kept weights' block of F^-1 is the inverse of their own Fisher: no coupling with the pruned ones.
    torch.testing.assert_close(inverse[2:, 2:].double() / lam, torch.linalg.inv(kept_fisher), rtol=1e-4, atol=0)
    assert float(inverse[:2, 2:].abs().max()) == 0.0


def test_conv1d_is_scored_and_updated_as_the_linear_it_transposes():
    generator = torch.Generator().manual_seed(3)
    linear = nn.Linear(16, 8, bias=False)
    conv = Conv1D(nf=8, nx=16)  # weight (16, 8): the same layer stored transposed
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
    grads = [torch.randn(8, 16, generator=generator) for _ in range(6)]
    on_linear = attached(linear, obs_block_size=16, obs_num_gradients=6)
    on_conv = ObsMethod(PruningConfig(method="obs", obs_block_size=16, obs_num_gradients=6))
    on_conv.attach({"layer": conv})
    feed(on_linear, linear, grads)
    for grad in grads:
        on_conv.on_gradients(["layer"], [conv.weight.detach()], [grad.t().contiguous()])
    scores = on_linear.scores("layer", linear)
    torch.testing.assert_close(on_conv.scores("layer", conv), scores.t())
    newly = scores < scores.median()
    on_linear.on_masks_updated("layer", linear, newly)
    on_conv.on_masks_updated("layer", conv, newly.t().contiguous())
    torch.testing.assert_close(conv.weight.detach(), linear.weight.detach().t())
    assert bool((linear.weight.detach()[newly] == 0).all())


def test_the_ring_keeps_the_last_gradients_in_float32():
    layer = nn.Linear(4, 2)
    method = attached(layer, obs_num_gradients=3)
    grads = [torch.full((2, 4), float(k), dtype=torch.bfloat16) for k in range(1, 6)]
    for grad in grads:
        method.on_gradients(["layer"], [layer.weight.detach()], [grad])
    ring = method.ring["layer"]
    assert ring.dtype == torch.float32 and method.count["layer"] == 3 and method.position["layer"] == 2
    assert [float(ring[k, 0, 0]) for k in range(3)] == [4.0, 5.0, 3.0]  # slot for slot: 4 and 5 overwrote 1 and 2


def test_state_loads_into_a_ring_of_another_size_keeping_the_most_recent():
    layer = nn.Linear(4, 2)
    source = attached(layer, obs_num_gradients=4)
    feed(source, layer, [torch.full((2, 4), float(k)) for k in range(1, 7)])  # slots hold 5, 6, 3, 4
    smaller = attached(layer, obs_num_gradients=2)
    smaller.load_state_dict(source.state_dict())
    assert [float(smaller.ring["layer"][k, 0, 0]) for k in range(2)] == [5.0, 6.0]
    assert smaller.count["layer"] == 2 and smaller.position["layer"] == 0
    same = attached(layer, obs_num_gradients=4)
    same.load_state_dict(source.state_dict())
    assert torch.equal(same.ring["layer"], source.ring["layer"]) and same.position["layer"] == 2


# ------------------------------------------------------------------------------------------------ in the Trainer
class WatchUpdates:
    """Wraps a Pruner's `on_masks_updated` to record, per call, how far the kept weights moved."""

    def __init__(self, pruner: Pruner) -> None:
        self.moves: list[float] = []
        method = pruner.method
        original = method.on_masks_updated

        def watched(name, module, newly_pruned):
            before = module.weight.detach().clone()
            original(name, module, newly_pruned)
            kept = ~newly_pruned & (before != 0)
            self.moves.append(float((module.weight.detach() - before)[kept].abs().max()) if kept.any() else 0.0)
            assert bool((module.weight.detach()[newly_pruned] == 0).all())

        method.on_masks_updated = watched


@pytest.mark.parametrize("pattern", [
    dict(granularity="unstructured", target_sparsity=0.75),
    dict(granularity="block", block_shape="1x4", target_sparsity=0.75),
    dict(granularity="n:m", n_m="2:4", target_sparsity=0.5),
], ids=["unstructured", "block-1x4", "2:4"])
def test_obs_reaches_the_target_at_the_end_step_and_pruned_weights_stay_zero(tmp_path, pattern):
    config = PruningConfig(method="obs", obs_num_gradients=4, **SCHEDULE, **pattern)
    trainer = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path), pruning_config=config,
                             train_dataset=random_classification_data())
    watch = WatchUpdates(trainer.pruner)
    trainer.train()
    pruner = trainer.pruner
    assert pruner.schedule.end_step == 16
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    for entry in logged.values():  # the zeros in the weights follow the schedule step by step
        assert entry["sparsity"] == pytest.approx(entry["scheduled_sparsity"], abs=1e-3)
    assert logged[15]["scheduled_sparsity"] < pattern["target_sparsity"]
    assert logged[16]["sparsity"] == pytest.approx(pattern["target_sparsity"], abs=1e-3)
    assert pruner.measured_sparsity() == pytest.approx(pattern["target_sparsity"], abs=1e-3)  # 4 steps later
    for name, module in pruner.modules.items():
        mask = pruner.masks[name]
        assert bool((module.weight.detach()[mask] == 0).all()), name
        if pattern["granularity"] == "n:m":
            assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()), name
        if pattern["granularity"] == "block":
            groups = mask.reshape(mask.shape[0], -1, 4)
            assert bool((groups.all(-1) | ~groups.any(-1)).all()), name
    # The OBS update ran at every mask update and moved kept weights (it is not plain zeroing).
    assert len(watch.moves) == 8 * len(pruner.modules) and max(watch.moves) > 0


def test_obs_with_a_plain_trainer_and_the_callback(tmp_path):
    callback = PruningCallback(PruningConfig(method="obs", target_sparsity=0.5, obs_num_gradients=4, **SCHEDULE))
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=random_classification_data(),
                      callbacks=[callback])
    watch = WatchUpdates(callback.pruner)
    trainer.train()
    assert isinstance(callback.pruner.method, ObsMethod)
    assert callback.pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)
    assert max(watch.moves) > 0 and callback.pruner.method.count  # gradients reached the ring


def test_resumed_obs_run_ends_with_the_masks_and_weights_of_an_uninterrupted_one(tmp_path):
    # 4 gradients in the ring, a checkpoint at step 7: the ring has wrapped (write position not 0) and mask updates
    # happen on both sides of the interruption.
    config = PruningConfig(method="obs", target_sparsity=0.75, obs_num_gradients=4, **SCHEDULE)
    args = dict(save_strategy="steps", save_steps=7)
    data = random_classification_data()
    whole = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path / "whole", **args), pruning_config=config,
                           train_dataset=data)
    whole.train()

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 7

    out = tmp_path / "interrupted"
    PruningTrainer(model=tiny_bert(), args=training_args(out, **args), pruning_config=config, train_dataset=data,
                   callbacks=[StopAt()]).train()
    saved = torch.load(out / "checkpoint-7" / STATE_NAME, weights_only=True)["method"]
    assert set(saved["count"].values()) == {4} and set(saved["position"].values()) == {7 % 4}

    resumed = PruningTrainer(model=tiny_bert(), args=training_args(out, **args), pruning_config=config,
                             train_dataset=data)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-7"))
    assert resumed.state.global_step == 20
    for name, mask in whole.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name]), name
    resumed_state = resumed.model.state_dict()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed_state[key], value), key


# ------------------------------------------------------------------------------------------------ refusals
def test_resume_under_other_obs_settings_is_refused_and_other_methods_ignore_them():
    saved = PruningConfig(method="obs", target_sparsity=0.5, obs_num_gradients=4).to_dict()
    pruner = Pruner(tiny_bert(), PruningConfig(method="obs", target_sparsity=0.5, obs_num_gradients=8))
    with pytest.raises(ValueError, match=r"obs_num_gradients: 4 in the checkpoint, 8 now"):
        pruner.check_resume_config(saved, "checkpoint-7")
    # A state written before the obs fields existed (no such keys) still resumes.
    pruner.check_resume_config({k: v for k, v in saved.items() if not k.startswith("obs_")}, "checkpoint-7")
    # A magnitude run does not use the ring: its obs_* settings are not part of what shaped its masks.
    magnitude = Pruner(tiny_bert(), PruningConfig(target_sparsity=0.5, obs_num_gradients=8))
    magnitude.check_resume_config({**saved, "method": "magnitude"}, "checkpoint-7")


@pytest.mark.parametrize("option, value, allowed", [
    ("obs_block_size", 0, "whole number >= 1"),
    ("obs_block_size", "32", "whole number >= 1"),
    ("obs_block_size", True, "whole number >= 1"),
    ("obs_block_size", 4096, "at most 1024"),
    ("obs_num_gradients", 0, "whole number >= 1"),
    ("obs_num_gradients", 2.5, "whole number >= 1"),
    ("obs_damp", 0.0, "> 0"),
    ("obs_damp", -1e-3, "> 0"),
    ("obs_damp", float("nan"), "> 0"),
    ("obs_damp", float("inf"), "> 0"),
    ("obs_damp", "1e-2", "> 0"),
])
def test_bad_obs_options_are_refused_naming_the_option(option, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"PruningConfig.{option}={value!r} is invalid") + ".*" + allowed):
        PruningConfig(method="obs", **{option: value})


def test_obs_is_refused_on_sharded_parameters(monkeypatch):
    monkeypatch.setattr(obs, "is_sharded", lambda tensor: True)  # as FSDP2's DTensors would answer
    with pytest.raises(ValueError, match="method='obs' is not supported under FSDP2.*DDP"):
        ObsMethod(PruningConfig(method="obs")).attach({"layer": nn.Linear(4, 4)})
