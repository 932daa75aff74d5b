"""The method registry: built-ins registered, a method defined here trains through both paths, errors list methods."""

from __future__ import annotations

import pytest
import torch
from conftest import random_classification_data, tiny_bert, training_args
from transformers import HfArgumentParser, Trainer

from hf_prune import (
    PruningCallback,
    PruningConfig,
    PruningMethod,
    PruningTrainer,
    available_methods,
    register_method,
)
from hf_prune.methods import get_method, unregister_method


class ReverseMagnitude(PruningMethod):
    """Keeps the SMALLEST weights: a criterion no built-in has, so the masks prove which method ran."""

    def scores(self, name, module):
        return -module.weight.detach().abs().float()


class CountingMethod(PruningMethod):
    """Needs gradients and a trainer: counts the steps it saw and adds a loss term."""

    needs_gradients = True
    requires_trainer = True

    def attach(self, modules):
        super().attach(modules)
        self.steps = 0
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def on_gradients(self, names, weights, grads):
        assert len(names) == len(weights) == len(grads) > 0
        self.steps += 1

    def scores(self, name, module):
        return module.weight.detach().abs().float()

    def parameters(self):
        return [self.bias]

    def loss(self):
        return (self.bias - 1.0) ** 2

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


@pytest.fixture
def registered():
    register_method("reverse_magnitude", ReverseMagnitude)
    register_method("counting", CountingMethod)
    yield
    unregister_method("reverse_magnitude")
    unregister_method("counting")


def test_builtins_are_registered():
    assert available_methods()[:3] == ("magnitude", "movement", "soft_movement")
    assert get_method("soft_movement").requires_trainer and not get_method("magnitude").requires_trainer


def test_unknown_method_error_lists_registered_ones_including_user_methods(registered):
    with pytest.raises(ValueError, match=r"PruningConfig.method='nope'.*'magnitude'.*'reverse_magnitude'"):
        PruningConfig(method="nope")


def test_help_lists_registered_methods_and_literal_choices(registered):
    parser = HfArgumentParser(PruningConfig)
    text = parser.format_help()
    assert "reverse_magnitude" in text and "counting" in text
    assert "{cubic,linear,one_shot}" in text and "{unstructured,block,n:m}" in text and "{global,local}" in text


def test_register_twice_and_non_method_raise(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_method("reverse_magnitude", CountingMethod)
    with pytest.raises(TypeError, match="subclass of hf_prune.PruningMethod"):
        register_method("bad", object)
    register_method("reverse_magnitude", ReverseMagnitude)  # same class again: fine


@pytest.mark.parametrize("path", ["callback", "trainer"])
def test_user_method_trains_through_both_paths(registered, tmp_path, path):
    config = PruningConfig(method="reverse_magnitude", target_sparsity=0.5, warmup_fraction=0.0,
                           cooldown_fraction=0.0, pruning_interval=5)
    model = tiny_bert(dropout=0.0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, max_steps=10)
    data = random_classification_data()
    if path == "callback":
        callback = PruningCallback(config)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        pruner = callback.pruner
    else:
        trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
        pruner = trainer.pruner
    trainer.train()
    assert isinstance(pruner.method, ReverseMagnitude)
    assert pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-6)
    # The criterion pruned the LARGEST weights: in every module the pruned positions started out larger than the
    # kept ones (magnitude pruning would give the opposite).
    for name, module in pruner.modules.items():
        pruned = pruner.masks[name]
        start = initial[f"{name}.weight"].abs()
        assert float(start[pruned].mean()) > 2 * float(start[~pruned].mean()), name
        assert bool((module.weight.detach()[pruned] == 0).all()), name


def test_method_that_requires_the_trainer_is_refused_by_the_callback_and_runs_in_the_trainer(registered, tmp_path):
    config = PruningConfig(method="counting", target_sparsity=0.5, warmup_fraction=0.0, cooldown_fraction=0.0)
    with pytest.raises(ValueError, match="method='counting'.*PruningTrainer"):
        PruningCallback(config)
    trainer = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=6),
                             train_dataset=random_classification_data(), pruning_config=config)
    trainer.train()
    method = trainer.pruner.method
    assert method.steps == 6
    # The learnable parameter was in the optimizer and the loss term pulled it towards 1.
    assert 0.0 < float(method.bias.detach()) <= 1.5
    assert trainer.pruner.state_dict()["method"] == {"steps": 6}


def test_soft_movement_is_refused_by_a_plain_callback():
    with pytest.raises(ValueError, match="soft_movement.*PruningTrainer"):
        PruningCallback(PruningConfig(method="soft_movement"))
