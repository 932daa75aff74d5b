"""PruningTrainer and the callbacks with the real Trainer: schedule, zeros, logging, checkpoints, saving."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

from conftest import random_classification_data, tiny_bert, training_args
from hf_prune import (
    MagnitudePruningCallback,
    MovementPruningCallback,
    PruningCallback,
    PruningConfig,
    PruningTrainer,
    sparsity_report,
)
from hf_prune.pruner import STATE_NAME

CONFIG = dict(target_sparsity=0.75, warmup_fraction=0.1, cooldown_fraction=0.2, pruning_interval=2)


def masks_of(pruner):
    return {name: mask.clone() for name, mask in pruner.masks.items()}


@pytest.mark.parametrize("method", ["magnitude", "movement", "soft_movement"])
def test_schedule_reaches_target_and_is_followed_at_logged_steps(tmp_path, classification_data, method):
    config = PruningConfig(method=method, **CONFIG)
    trainer = PruningTrainer(
        model=tiny_bert(), args=training_args(tmp_path), pruning_config=config, train_dataset=classification_data
    )
    trainer.train()
    report = sparsity_report(trainer.model)
    assert abs(report["global_sparsity"] - 0.75) <= 0.001
    schedule = trainer.pruner.schedule
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 20
    for entry in logged:
        step = entry["step"]
        # Masks change at update steps only; between them the last update's sparsity holds.
        last_update = max([s for s in range(step + 1) if schedule.is_update_step(s)], default=0)
        expected = schedule.sparsity_at(last_update) if last_update else 0.0
        assert entry["scheduled_sparsity"] == pytest.approx(expected, abs=1e-5)
        assert entry["sparsity"] == pytest.approx(expected, abs=1e-3)
    assert schedule.end_step == 16 and logged[15]["sparsity"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("bf16", [False, True])
def test_pruned_weights_stay_zero_through_optimizer_steps(tmp_path, classification_data, bf16):
    class CheckZeros(TrainerCallback):
        def __init__(self):
            self.checked = 0

        def on_step_begin(self, args, state, control, **kwargs):
            for name, mask in pruner_ref[0].masks.items():
                if mask is not None:
                    weight = pruner_ref[0].modules[name].weight
                    assert torch.all(weight[mask] == 0), f"{name} revived at step {state.global_step}"
                    self.checked += 1

    pruner_ref = []
    checker = CheckZeros()
    config = PruningConfig(method="magnitude", schedule="one_shot", target_sparsity=0.5, warmup_fraction=0.1)
    trainer = PruningTrainer(
        model=tiny_bert(),
        args=training_args(tmp_path, bf16=bf16, learning_rate=5e-2, max_steps=15),
        pruning_config=config,
        train_dataset=classification_data,
        callbacks=[checker],
    )
    pruner_ref.append(trainer.pruner)
    trainer.train()
    # The one-shot prune happens at step round(0.1 * 15) = 2; the 12 masks are checked before each of steps 3..15.
    assert checker.checked == 13 * 12
    # Adam state of pruned weights must not hold momentum that could revive them.
    for name, mask in trainer.pruner.masks.items():
        weight = trainer.pruner.modules[name].weight
        assert torch.all(weight[mask] == 0)
        exp_avg = trainer.optimizer.state[weight]["exp_avg"]
        assert torch.all(exp_avg[mask].abs() < 1e-6)


@pytest.mark.parametrize(
    "method,callback_cls", [("magnitude", MagnitudePruningCallback), ("movement", MovementPruningCallback)]
)
def test_callback_and_trainer_give_the_same_masks(tmp_path, classification_data, method, callback_cls):
    config = PruningConfig(method=method, **CONFIG)
    pruning_trainer = PruningTrainer(
        model=tiny_bert(), args=training_args(tmp_path / "a"), pruning_config=config, train_dataset=classification_data
    )
    pruning_trainer.train()
    callback = callback_cls(config)
    plain = Trainer(
        model=tiny_bert(), args=training_args(tmp_path / "b"), train_dataset=classification_data, callbacks=[callback]
    )
    plain.train()
    for name, mask in pruning_trainer.pruner.masks.items():
        assert torch.equal(mask, callback.pruner.masks[name]), name
    assert callback.pruner.measured_sparsity() == pytest.approx(0.75, abs=1e-3)


def test_callback_logs_sparsity_before_reporting_callbacks(tmp_path, classification_data):
    class Reporter(TrainerCallback):
        """Stands where TensorBoard/W&B stand: registered before user callbacks."""

        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    reporter = Reporter()
    callback = MagnitudePruningCallback(PruningConfig(**CONFIG))
    trainer = Trainer(
        model=tiny_bert(),
        args=training_args(tmp_path),
        train_dataset=classification_data,
        callbacks=[reporter, callback],
    )
    # Trainer gives a callback no handle on its callback list, so the trainer is handed over to put the callback first.
    assert callback.attach(trainer) is trainer and trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    training_logs = [logs for logs in reporter.seen if "loss" in logs]
    assert len(training_logs) == 20 and all("sparsity" in logs for logs in training_logs)
    assert training_logs[-1]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert all("sparsity" in h for h in trainer.state.log_history if "loss" in h)


def test_a_callback_behind_reporters_says_how_to_put_it_first(tmp_path, classification_data, caplog):
    import logging

    def train(attach):
        callback = MagnitudePruningCallback(PruningConfig(**CONFIG))
        trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=2),
                          train_dataset=classification_data, callbacks=[callback])
        trainer.args.report_to = ["tensorboard"]  # as report_to="tensorboard" sets it, without needing tensorboard
        if attach:
            callback.attach(trainer)
        with caplog.at_level(logging.WARNING):
            trainer.train()

    train(attach=False)
    assert caplog.text.count("runs after the reporting callbacks ['tensorboard']") == 1
    assert "attach(trainer)" in caplog.text
    caplog.clear()
    train(attach=True)
    assert "reporting callbacks" not in caplog.text


def test_pruning_trainer_puts_its_callback_first(tmp_path, classification_data):
    trainer = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path), pruning_config=PruningConfig(**CONFIG),
                             train_dataset=classification_data, callbacks=[TrainerCallback()])
    assert trainer.callback_handler.callbacks[0] is trainer.pruning_callback
    with pytest.raises(ValueError, match="adds its own pruning callback"):
        MagnitudePruningCallback().attach(trainer)


def test_attach_adds_a_callback_the_trainer_was_not_given(tmp_path, classification_data):
    plain = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=classification_data)
    callback = MagnitudePruningCallback(PruningConfig(**CONFIG))
    callback.attach(plain)
    assert plain.callback_handler.callbacks[0] is callback and callback.pruner.model is plain.model  # built, as at init
    assert sum(c is callback for c in plain.callback_handler.callbacks) == 1


@pytest.mark.parametrize("method", ["magnitude", "movement", "soft_movement"])
def test_resume_from_checkpoint_ends_with_the_same_masks(tmp_path, classification_data, method):
    config = PruningConfig(method=method, **CONFIG)
    args = dict(save_strategy="steps", save_steps=7)
    full = PruningTrainer(
        model=tiny_bert(), args=training_args(tmp_path / "full", **args), pruning_config=config,
        train_dataset=classification_data,
    )
    full.train()

    interrupted_dir = tmp_path / "interrupted"
    first = PruningTrainer(
        model=tiny_bert(), args=training_args(interrupted_dir, max_steps=20, **args), pruning_config=config,
        train_dataset=classification_data,
    )

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                control.should_training_stop = True

    first.add_callback(StopAt())
    first.train()
    checkpoint = interrupted_dir / "checkpoint-7"
    assert (checkpoint / STATE_NAME).is_file() and (checkpoint / "pruning_config.json").is_file()

    resumed = PruningTrainer(
        model=tiny_bert(), args=training_args(interrupted_dir, **args), pruning_config=config,
        train_dataset=classification_data,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 20
    for name, mask in full.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name]), name
    assert resumed.pruner.measured_sparsity() == pytest.approx(0.75, abs=1e-3)


def test_callback_resumes_from_output_dir_checkpoint(tmp_path, classification_data):
    config = PruningConfig(method="movement", **CONFIG)
    args = dict(save_strategy="steps", save_steps=10)
    full_callback = MovementPruningCallback(config)
    full = Trainer(model=tiny_bert(), args=training_args(tmp_path / "full", **args),
                   train_dataset=classification_data, callbacks=[full_callback])
    full.train()
    full_masks = masks_of(full_callback.pruner)

    out = tmp_path / "resumed"
    first = Trainer(model=tiny_bert(), args=training_args(out, **args), train_dataset=classification_data,
                    callbacks=[MovementPruningCallback(config)])

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 10

    first.add_callback(StopAt())
    first.train()
    callback = MovementPruningCallback(config)
    second = Trainer(model=tiny_bert(), args=training_args(out, **args), train_dataset=classification_data,
                     callbacks=[callback])
    second.train(resume_from_checkpoint=True)
    for name, mask in full_masks.items():
        assert torch.equal(mask, callback.pruner.masks[name]), name


def test_save_model_reloads_without_hf_prune(tmp_path, classification_data):
    config = PruningConfig(method="movement", **CONFIG)
    trainer = PruningTrainer(
        model=tiny_bert(), args=training_args(tmp_path), pruning_config=config, train_dataset=classification_data
    )
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    for name in ("config.json", "model.safetensors", "pruning_config.json", "sparsity_report.json", "README.md"):
        assert (out / name).is_file(), name
    assert PruningConfig.from_pretrained(str(out)) == config
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["global_sparsity"] == pytest.approx(0.75, abs=1e-3)
    card = (out / "README.md").read_text()
    assert "hf_prune" in card and "75.00%" in card

    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    model = trainer.model.eval()
    batch = torch.tensor(classification_data[:4]["input_ids"])
    saved_state = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, saved_state[key]), key
    # The exact check is the state dict above. Logits get a float tolerance: after a bf16-autocast Trainer run in the
    # same process, CPU kernels were seen to differ by ~6e-5 between two objects with identical weights.
    # In float64 (copies), so that kernel choices made earlier in the process cannot show up as differences.
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(batch).logits
        torch.testing.assert_close(reloaded.double()(batch).logits, expected, rtol=0, atol=1e-9)
    assert sparsity_report(reloaded)["global_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert not any("mask" in k or "orig" in k for k in reloaded.state_dict())


def test_model_card_section_survives_trainer_card(tmp_path, classification_data):
    trainer = PruningTrainer(
        model=tiny_bert(), args=training_args(tmp_path), pruning_config=PruningConfig(**CONFIG),
        train_dataset=classification_data,
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert card.count("<!-- hf_prune:begin -->") == 1 and "Pruning (hf_prune)" in card


def _movement_run(tmp_path, data, accumulation, batch, callbacks=()):
    config = PruningConfig(method="movement", target_sparsity=0.5, warmup_fraction=0.5, cooldown_fraction=0.1)
    # No dropout: its random masks would differ between one batch of 8 and two of 4.
    trainer = PruningTrainer(
        model=tiny_bert(dropout=0.0),
        args=training_args(tmp_path / f"acc{accumulation}", max_steps=4, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, learning_rate=1e-4),
        pruning_config=config,
        train_dataset=data,
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


def test_movement_scores_use_complete_accumulated_gradients(tmp_path, classification_data):
    class Reference(TrainerCallback):
        """Independent -W * dL/dW sum, taken where the optimizer sees the full accumulated gradient."""

        def __init__(self):
            self.sums, self.calls = {}, 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.calls += 1
            for name, module in model.named_modules():
                if name in trainer_modules:
                    value = -(module.weight.detach() * module.weight.grad)
                    self.sums[name] = self.sums.get(name, 0) + value

    trainer_modules = set(
        n for n, m in tiny_bert().named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n
    )
    reference = Reference()
    trainer = _movement_run(tmp_path, classification_data, accumulation=2, batch=4, callbacks=[reference])
    assert reference.calls == 4  # once per optimizer step, not per micro-batch
    assert set(trainer.pruner.scores) == trainer_modules
    for name, score in trainer.pruner.scores.items():
        assert score.abs().sum() > 0
        torch.testing.assert_close(score, reference.sums[name], rtol=1e-5, atol=1e-12)


@pytest.mark.skipif(
    transformers.__version__.startswith("5."),
    reason="Transformers 5 sums (not averages) micro-batch losses of models that accept loss kwargs",
)
def test_movement_scores_match_an_unaccumulated_batch(tmp_path, classification_data):
    whole = _movement_run(tmp_path, classification_data, accumulation=1, batch=8).pruner.scores
    accumulated = _movement_run(tmp_path, classification_data, accumulation=2, batch=4).pruner.scores
    for name, score in whole.items():
        torch.testing.assert_close(accumulated[name], score, rtol=1e-3, atol=1e-6)


def test_distillation_changes_the_loss_and_checks_labels(tmp_path, classification_data):
    teacher = tiny_bert(seed=1)
    trainer = PruningTrainer(
        model=tiny_bert(), args=training_args(tmp_path, max_steps=2), pruning_config=PruningConfig(**CONFIG),
        teacher_model=teacher, train_dataset=classification_data,
    )
    assert not trainer.teacher_model.training
    batch = {k: torch.tensor(v) for k, v in classification_data[:8].items()}
    trainer.model.train()
    with_teacher = trainer.compute_loss(trainer.model, batch)
    trainer.teacher_model = None
    without = trainer.compute_loss(trainer.model, batch)
    assert not torch.isclose(with_teacher, without)
    with_teacher.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="num_labels"):
        PruningTrainer(model=tiny_bert(), args=training_args(tmp_path), teacher_model=tiny_bert(num_labels=2),
                       train_dataset=classification_data)


def test_bad_input_fails_before_training(tmp_path, classification_data):
    with pytest.raises(ValueError, match="targets"):
        Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=classification_data,
                callbacks=[MagnitudePruningCallback(PruningConfig(targets=[r"no_such_module"]))])
    with pytest.raises(ValueError, match="n_m"):
        PruningTrainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=classification_data,
                       pruning_config=PruningConfig(granularity="n:m", n_m="2:3", target_sparsity=1 / 3))
    with pytest.raises(ValueError, match="soft_movement"):
        MovementPruningCallback(PruningConfig(method="soft_movement"))
    with pytest.raises(ValueError, match="method"):
        MagnitudePruningCallback(PruningConfig(method="movement"))


@pytest.mark.parametrize("granularity,extra", [("block", {"block_shape": "4x4"}), ("n:m", {"n_m": "2:4"})])
def test_structured_patterns_through_the_trainer(tmp_path, classification_data, granularity, extra):
    config = PruningConfig(granularity=granularity, target_sparsity=0.5, **extra,
                           **{k: v for k, v in CONFIG.items() if k != "target_sparsity"})
    trainer = PruningTrainer(
        model=tiny_bert(), args=training_args(tmp_path), pruning_config=config, train_dataset=classification_data
    )
    trainer.train()
    for name, module in trainer.pruner.modules.items():
        weight = module.weight.detach()
        if granularity == "block":
            blocks = (weight == 0).reshape(weight.shape[0] // 4, 4, weight.shape[1] // 4, 4).float().mean(dim=(1, 3))
            assert torch.all((blocks == 0) | (blocks == 1)), name
        else:
            assert torch.all((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2), name
    assert sparsity_report(trainer.model)["global_sparsity"] == pytest.approx(0.5, abs=1e-3)


# ------------------------------------------------------------------------------- artifacts and tags on every save
def test_plain_trainer_with_a_callback_saves_artifacts_everywhere_and_tags_the_model(tmp_path):
    import copy
    import json

    from transformers import Trainer

    from hf_prune import MagnitudePruningCallback

    model = tiny_bert()
    config = PruningConfig(target_sparsity=0.5, warmup_fraction=0.0, cooldown_fraction=0.0)
    trainer = Trainer(model=model, args=training_args(tmp_path / "out", max_steps=4, save_strategy="steps",
                                                      save_steps=4),
                      train_dataset=random_classification_data(), callbacks=[MagnitudePruningCallback(config)])
    trainer.train()
    elsewhere = tmp_path / "elsewhere"
    trainer.save_model(str(elsewhere))
    for directory in (elsewhere, tmp_path / "out" / "checkpoint-4"):
        assert PruningConfig.from_pretrained(str(directory)) == config
        report = json.loads((directory / "sparsity_report.json").read_text())
        assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
        assert "## Pruning (hf_prune)" in (directory / "README.md").read_text()
    assert {"hf_prune", "pruning", "magnitude"} <= set(model.model_tags)
    # Trainer.push_to_hub passes model.model_tags to its model card: what it would upload carries them.
    trainer.create_model_card(model_name="tiny", tags=list(model.model_tags))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- hf_prune" in card and "- pruning" in card and "- magnitude" in card
    # A deep copy saves itself, not the original.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    twin.save_pretrained(str(tmp_path / "twin"))
    reloaded = type(model).from_pretrained(str(tmp_path / "twin"))
    assert torch.equal(next(reloaded.parameters()), next(twin.parameters()))
    assert (tmp_path / "twin" / "pruning_config.json").is_file()


# ------------------------------------------------------------------------------------------------ hidden-state
# distillation from the unpruned teacher into a depth- or width-pruned student
def test_hidden_state_distillation_aligns_layers_and_channels_of_a_pruned_student():
    from hf_prune import prune_hidden, prune_layers
    from hf_prune.structure import zero_hidden_channels
    from hf_prune.trainer import hidden_state_alignment, hidden_state_loss

    teacher = tiny_bert(dropout=0.0).eval()  # 2 layers, hidden 32
    zero_hidden_channels(teacher, [1, 5, 9, 30])
    student = prune_hidden(prune_layers(copy.deepcopy(teacher), [1]), [1, 5, 9, 30], exact=True)
    inputs = {"input_ids": torch.randint(5, 100, (2, 7)), "output_hidden_states": True}
    with torch.no_grad():
        s, t = student(**inputs).hidden_states, teacher(**inputs).hidden_states
    layers, channels = hidden_state_alignment(student, t[-1].shape[-1])
    assert layers == [0, 1] and channels.tolist() == [c for c in range(32) if c not in (1, 5, 9, 30)]
    # The student is the teacher with its zeroed channels and its last layer removed: its states are the teacher's.
    assert hidden_state_loss(s, t, layers, channels).item() < 1e-10
    # A student whose layer 0 went compares its one layer with the teacher's layer 1, not layer 0.
    shallow = prune_layers(copy.deepcopy(teacher), [0])
    assert hidden_state_alignment(shallow, 32)[0] == [0, 2]
    with pytest.raises(ValueError, match="original hidden size \\(32\\), got 16"):
        hidden_state_alignment(student, 16)


def test_pruning_trainer_distils_hidden_states_into_a_width_and_depth_pruned_student(tmp_path):
    from hf_prune import prune_hidden, prune_layers

    teacher = tiny_bert().eval()
    student = prune_hidden(prune_layers(copy.deepcopy(teacher), [1]), list(range(8)))
    trainer = PruningTrainer(
        model=student, args=training_args(tmp_path, max_steps=3), teacher_model=teacher,
        pruning_config=PruningConfig(target_sparsity=0.0, distillation_hidden_weight=1.0),
        train_dataset=random_classification_data(24),
    )
    assert trainer.train().training_loss > 0
    assert student.config.hidden_size == 24 and student.config.num_hidden_layers == 1


class RecordLearningRate(TrainerCallback):
    def __init__(self):
        self.rates = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step + 1] = optimizer.param_groups[0]["lr"]  # the rate step N+1 is taken with


def test_rewarm_after_pruning_restores_the_peak_rate_after_the_last_mask_update(tmp_path):
    # 20 steps, masks updated from step 2 to step 14 (cooldown 0.3): then the rate jumps back to the peak and
    # decays linearly to 0 at step 20; before that it is Trainer's own linear decay.
    schedule = dict(target_sparsity=0.5, warmup_fraction=0.1, cooldown_fraction=0.3, pruning_interval=2)
    runs = {}
    for rewarm in (False, True):
        record = RecordLearningRate()
        trainer = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path / str(rewarm), learning_rate=1e-3),
                                 pruning_config=PruningConfig(**schedule, rewarm_after_pruning=rewarm),
                                 train_dataset=random_classification_data(), callbacks=[record])
        trainer.train()
        assert trainer.pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)
        runs[rewarm] = record.rates
    plain, rewarmed = runs[False], runs[True]
    assert [rewarmed[s] for s in range(1, 15)] == pytest.approx([plain[s] for s in range(1, 15)])
    assert rewarmed[15] == pytest.approx(1e-3) and plain[15] == pytest.approx(1e-3 * 6 / 20)
    assert [rewarmed[s] for s in range(15, 21)] == pytest.approx([1e-3 * (20 - s + 1) / 6 for s in range(15, 21)])


def test_rewarm_after_pruning_needs_a_schedule_of_factors(tmp_path):
    trainer = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path, lr_scheduler_type="reduce_lr_on_plateau",
                                                                   eval_strategy="steps", eval_steps=5),
                             pruning_config=PruningConfig(target_sparsity=0.5, rewarm_after_pruning=True),
                             train_dataset=random_classification_data(), eval_dataset=random_classification_data())
    with pytest.raises(ValueError, match="rewarm_after_pruning=True needs a learning-rate schedule given as factors"):
        trainer.train()
    with pytest.raises(ValueError, match="rewarm_after_pruning"):
        PruningConfig(rewarm_after_pruning="yes")


@pytest.mark.parametrize("case, learning_rate, target, warned", [
    ("encoder at 90% and the dense rate", 1e-4, 0.9, True),
    ("encoder at 90% and a large rate", 1e-3, 0.9, False),
    ("encoder at 50%", 1e-4, 0.5, False),
    ("causal LM at 90%", 1e-4, 0.9, False),
    ("obs at 90% and the dense rate", 1e-4, 0.9, False),  # it compensates itself: 90% kept at 1e-4
])
def test_a_small_learning_rate_at_high_sparsity_is_named_with_the_rate_to_use(tmp_path, caplog, case, learning_rate,
                                                                               target, warned):
    import logging

    from conftest import tiny_causal_lm

    config = PruningConfig(target_sparsity=target, warmup_fraction=0.0, cooldown_fraction=0.0, pruning_interval=1)
    if case.startswith("causal"):
        model = tiny_causal_lm()
        data = [{"input_ids": torch.arange(8) % 100, "labels": torch.arange(8) % 100} for _ in range(8)]
    else:
        model, data = tiny_bert(), random_classification_data()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2, learning_rate=learning_rate),
                      train_dataset=data, callbacks=[MagnitudePruningCallback(config) if not case.startswith("obs")
                                                     else PruningCallback(dataclasses.replace(config, method="obs"))])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    message = f"pruning to 90% of the weights with learning_rate={learning_rate:g}"
    assert (message in caplog.text) is warned, case
    if warned:
        assert caplog.text.count(message) == 1
        assert "TrainingArguments(learning_rate=0.001) together with PruningConfig(scope='global')" in caplog.text
        assert "method='obs'" in caplog.text
        assert "PruningTrainer with the dense model as teacher" in caplog.text
