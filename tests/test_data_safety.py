"""Work that must never be lost: each test here failed before its fix (issue 15)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune as torch_prune
import transformers
from transformers import AutoModelForSequenceClassification, Trainer

import hf_prune
import hf_prune.pruner
from conftest import random_classification_data, tiny_bert, training_args
from hf_prune import MagnitudePruningCallback, PruningConfig, PruningTrainer, fold_torch_prune

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------------------------------------ torch.nn.utils.prune
def blog_pruned_bert():
    """A tiny BERT as blog recipes leave it: torch.nn.utils.prune wrappers (weight_orig + weight_mask) on two Linears."""
    model = tiny_bert()
    for module in (model.bert.encoder.layer[0].intermediate.dense, model.bert.encoder.layer[1].attention.self.query):
        torch_prune.l1_unstructured(module, "weight", amount=0.4)
    return model


@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_torch_prune_wrappers_are_folded_and_the_checkpoint_reloads(tmp_path, path):
    model = blog_pruned_bert()
    blog_zeros = model.bert.encoder.layer[0].intermediate.dense.weight_mask == 0
    config = PruningConfig(target_sparsity=0.5, warmup_fraction=0.0, cooldown_fraction=0.0)
    args = training_args(tmp_path / "run", max_steps=4)
    data = random_classification_data(32)
    if path == "trainer":
        trainer = PruningTrainer(model=model, args=args, pruning_config=config, train_dataset=data)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MagnitudePruningCallback(config)])
    # Folded when pruning is set up: plain Parameters again, the blog's zeros kept.
    dense = model.bert.encoder.layer[0].intermediate.dense
    assert not hasattr(dense, "weight_orig") and isinstance(dense.weight, torch.nn.Parameter)
    assert torch.all(dense.weight[blog_zeros] == 0)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    state = model.state_dict()
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name  # nothing silently re-initialised
    assert torch.all(reloaded.bert.encoder.layer[0].intermediate.dense.weight[blog_zeros] == 0)


def test_a_save_that_would_write_torch_prune_keys_is_refused(tmp_path):
    model = tiny_bert()
    trainer = PruningTrainer(model=model, args=training_args(tmp_path / "run", max_steps=1),
                             pruning_config=PruningConfig(target_sparsity=0.5),
                             train_dataset=random_classification_data(16))
    torch_prune.random_unstructured(model.classifier, "weight", amount=0.5)  # wrapped after pruning was set up
    with pytest.raises(ValueError, match=r"torch.nn.utils.prune wrappers \(\['classifier.weight'\]\).*fold_torch_prune"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    assert fold_torch_prune(model) == ["classifier.weight"]
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ resume
STEPS = dict(max_steps=12, save_strategy="steps", save_steps=4)
BASE = dict(target_sparsity=0.5, warmup_fraction=0.0, cooldown_fraction=0.25, pruning_interval=2)


def interrupted_run(out, config, stop_at=4, callback=False, seed=0):
    """Train with checkpoints every 4 steps and stop after `stop_at`: what a crashed job leaves."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == stop_at

    data = random_classification_data(64)
    if callback:
        trainer = Trainer(model=tiny_bert(seed=seed), args=training_args(out, **STEPS), train_dataset=data,
                          callbacks=[hf_prune.PruningCallback(config), StopAt()])
    else:
        trainer = PruningTrainer(model=tiny_bert(), args=training_args(out, **STEPS), pruning_config=config,
                                 train_dataset=data, callbacks=[StopAt()])
    trainer.train()
    return trainer


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", [dict(granularity="block", block_shape="4x4"), dict(target_sparsity=0.7),
                                    dict(method="movement")])
def test_resume_with_another_pruning_config_is_refused_and_the_checkpoints_kept(tmp_path, change):
    out = tmp_path / "run"
    interrupted_run(out, PruningConfig(**BASE))
    before = snapshot(out)
    changed = PruningConfig(**{**BASE, **change})
    resumed = PruningTrainer(model=tiny_bert(), args=training_args(out, **STEPS), pruning_config=changed,
                             train_dataset=random_classification_data(64))
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"{key}: .* in the checkpoint, .* now.*allow_resume_changes=True"):
        resumed.train(resume_from_checkpoint=True)
    assert snapshot(out) == before  # nothing written, nothing rotated away


def test_resume_with_another_config_runs_when_allowed(tmp_path):
    out = tmp_path / "run"
    interrupted_run(out, PruningConfig(**BASE))
    changed = PruningConfig(**{**BASE, "target_sparsity": 0.7, "allow_resume_changes": True})
    resumed = PruningTrainer(model=tiny_bert(), args=training_args(out, **STEPS), pruning_config=changed,
                             train_dataset=random_classification_data(64))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 12
    assert resumed.pruner.measured_sparsity() == pytest.approx(0.7, abs=1e-3)  # the new config's target


def test_the_callback_resumes_from_a_checkpoint_outside_output_dir(tmp_path):
    import shutil

    config = PruningConfig(method="movement", **BASE)
    full = Trainer(model=tiny_bert(), args=training_args(tmp_path / "full", **STEPS),
                   train_dataset=random_classification_data(64), callbacks=[hf_prune.PruningCallback(config)])
    full.train()
    interrupted_run(tmp_path / "first", config, stop_at=8, callback=True)
    moved = tmp_path / "elsewhere" / "checkpoint-8"
    shutil.copytree(tmp_path / "first" / "checkpoint-8", moved)
    shutil.rmtree(tmp_path / "first")
    callback = hf_prune.PruningCallback(config)
    # Trainer does not tell its callbacks the folder given to train(): TrainingArguments.resume_from_checkpoint does.
    second = Trainer(model=tiny_bert(), args=training_args(tmp_path / "second", resume_from_checkpoint=str(moved),
                                                           **STEPS),
                     train_dataset=random_classification_data(64), callbacks=[callback])
    second.train(resume_from_checkpoint=str(moved))
    full_pruner = next(c.pruner for c in full.callback_handler.callbacks if isinstance(c, hf_prune.PruningCallback))
    for name, mask in full_pruner.masks.items():
        assert torch.equal(mask, callback.pruner.masks[name]), name  # scores and masks restored, not rebuilt


def test_the_callback_restores_the_checkpoint_trainer_resumed_not_a_same_step_one_of_another_run(tmp_path):
    # output_dir holds checkpoint-8 of another run (another seed, same config); the run resumes from its own
    # checkpoint-8 elsewhere. The callback is not told that folder by train(), and must not take output_dir's.
    config = PruningConfig(method="movement", **BASE)
    full = Trainer(model=tiny_bert(), args=training_args(tmp_path / "full", **STEPS),
                   train_dataset=random_classification_data(64), callbacks=[hf_prune.PruningCallback(config)])
    full.train()
    interrupted_run(tmp_path / "first", config, stop_at=8, callback=True)
    interrupted_run(tmp_path / "other", config, stop_at=8, callback=True, seed=1)
    own, others = tmp_path / "first" / "checkpoint-8", tmp_path / "other" / "checkpoint-8"
    assert (others / hf_prune.pruner.STATE_NAME).is_file()

    untold = Trainer(model=tiny_bert(), args=training_args(tmp_path / "other", **STEPS),
                     train_dataset=random_classification_data(64), callbacks=[hf_prune.PruningCallback(config)])
    with pytest.raises(ValueError, match="hold one, but their trainer_state.json is not the state Trainer resumed"):
        untold.train(resume_from_checkpoint=str(own))

    callback = hf_prune.PruningCallback(config)
    told = Trainer(model=tiny_bert(), args=training_args(tmp_path / "other", resume_from_checkpoint=str(own), **STEPS),
                   train_dataset=random_classification_data(64), callbacks=[callback])
    told.train(resume_from_checkpoint=str(own))
    assert told.state.global_step == 12
    full_pruner = next(c.pruner for c in full.callback_handler.callbacks if isinstance(c, hf_prune.PruningCallback))
    for name, mask in full_pruner.masks.items():
        assert torch.equal(mask, callback.pruner.masks[name]), name  # the run's own scores, restored


def test_resuming_movement_without_its_state_is_refused(tmp_path):
    config = PruningConfig(method="movement", **BASE)
    out = tmp_path / "run"
    interrupted_run(out, config, stop_at=8, callback=True)
    for state in out.rglob(hf_prune.pruner.STATE_NAME):
        state.unlink()  # a checkpoint written without hf_prune's state (or from before hf_prune)
    second = Trainer(model=tiny_bert(), args=training_args(out, **STEPS), train_dataset=random_classification_data(64),
                     callbacks=[hf_prune.PruningCallback(config)])
    with pytest.raises(ValueError, match="no hf_prune_state.pt was found .* scores would restart"):
        second.train(resume_from_checkpoint=True)


def test_the_pruning_state_is_in_each_checkpoint_before_old_ones_are_rotated_away(tmp_path, monkeypatch):
    # Trainer deletes old checkpoints (save_total_limit) right after writing a new one, before callbacks' on_save:
    # record what the newest checkpoint holds at that moment.
    seen = []
    import transformers.trainer

    trainer = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path, save_total_limit=1, **STEPS),
                             pruning_config=PruningConfig(**BASE), train_dataset=random_classification_data(64))

    def recording(rotate):
        def rotate_and_record(*args, **kwargs):
            newest = max(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            seen.append((newest.name, (newest / hf_prune.pruner.STATE_NAME).is_file()))
            return rotate(*args, **kwargs)
        return rotate_and_record

    if hasattr(trainer, "_rotate_checkpoints"):  # Transformers 4.x: a Trainer method
        monkeypatch.setattr(trainer, "_rotate_checkpoints", recording(trainer._rotate_checkpoints))
    else:  # Transformers 5: a function of transformers.trainer_utils that Trainer imports
        monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", recording(transformers.trainer.rotate_checkpoints))
    trainer.train()
    assert seen == [("checkpoint-4", True), ("checkpoint-8", True), ("checkpoint-12", True)]


# ------------------------------------------------------------------------------------------------ saves as a set
def pruned_trainer(out, steps=4):
    trainer = PruningTrainer(model=tiny_bert(), args=training_args(out, max_steps=steps),
                             pruning_config=PruningConfig(**BASE), train_dataset=random_classification_data(32))
    trainer.train()
    return trainer


def test_a_failed_save_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    import hf_prune.finalize

    trainer = pruned_trainer(tmp_path / "run")
    target = tmp_path / "model"
    trainer.save_model(str(target))
    before = snapshot(target)
    trainer.train()  # weights change

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # The weights are written, then the sidecar files: fail in between.
    monkeypatch.setattr(hf_prune.finalize, "config_sparsity_report", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model(str(target))
    assert snapshot(target) == before  # the old weights with their own sidecar files, nothing half-new
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")] == []


def test_save_model_keeps_checkpoints_and_drops_stale_weight_files(tmp_path):
    out = tmp_path / "run"
    trainer = PruningTrainer(model=tiny_bert(), args=training_args(out, **STEPS), pruning_config=PruningConfig(**BASE),
                             train_dataset=random_classification_data(64))
    trainer.train()
    trainer.model.save_pretrained(str(out), max_shard_size="20KB")  # an earlier sharded save in the same folder
    assert list(out.glob("model-*-of-*.safetensors"))
    (out / "notes.txt").write_text("mine")
    trainer.save_model()  # into args.output_dir, where the checkpoints are
    assert not list(out.glob("model-*-of-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert (out / "checkpoint-8" / hf_prune.pruner.STATE_NAME).is_file() and (out / "notes.txt").read_text() == "mine"
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name


def test_leftovers_of_killed_saves_are_cleaned_and_a_lost_folder_restored(tmp_path):
    import os
    import socket
    import subprocess
    import time

    from hf_prune.files import recover_leftovers, staged_directory

    host = socket.gethostname().replace("-", "_")
    child = subprocess.Popen(["true"])
    child.wait()
    dead_tag = f"{host}-{child.pid}-deadbeef"
    live_tag = f"{host}-{os.getpid()}-cafe0000"
    model = tmp_path / "model"
    # Killed between moving the good folder aside and moving the new one in: the good one is only "previous".
    (tmp_path / f".model.previous-{dead_tag}").mkdir()
    (tmp_path / f".model.previous-{dead_tag}" / "config.json").write_text("{}")
    (tmp_path / f".model.staging-{dead_tag}").mkdir()
    (tmp_path / f".model.staging-{live_tag}").mkdir()  # a save still running in this process
    # A save into the dead process's staging folder (Trainer.save_model inside a command's staged OUT/model) staged
    # in turn beside it; the live process's nested one is still being written.
    (tmp_path / f"..model.staging-{dead_tag}.staging-{dead_tag}").mkdir()
    (tmp_path / f"..model.staging-{live_tag}.staging-{live_tag}").mkdir()
    legacy = tmp_path / ".model.partial-k2j3"
    legacy.mkdir()
    old = time.time() - 2 * 24 * 3600
    os.utime(legacy, (old, old))
    done = recover_leftovers(str(model))
    assert (model / "config.json").read_text() == "{}"
    assert len(done) == 4 and any(d.startswith("restored") for d in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"..model.staging-{live_tag}.staging-{live_tag}",
                                                          f".model.staging-{live_tag}", "model"]
    with staged_directory(str(model)) as staging:
        (tmp_path / "x").write_text("")  # the block runs; the live staging folder is not ours to delete
        assert os.path.isdir(staging)
    assert (tmp_path / f".model.staging-{live_tag}").is_dir()


# ------------------------------------------------------------------------------------------------ fp16 and ties
def movement_pruner(check_finite=True):
    from hf_prune import Pruner

    model = tiny_bert(dropout=0.0)
    pruner = Pruner(model, PruningConfig(method="movement", target_sparsity=0.5, warmup_fraction=0.0,
                                         cooldown_fraction=0.0, pruning_interval=1))
    pruner.check_finite_gradients = check_finite
    pruner.start(10)
    return model, pruner


def test_a_step_with_inf_gradients_adds_nothing_to_the_scores():
    model, pruner = movement_pruner()
    loss = model(input_ids=torch.randint(1, 100, (2, 6)), labels=torch.tensor([0, 1])).loss
    loss.backward()
    before = {n: s.clone() for n, s in pruner.method.state_dict()["scores"].items()}
    first = next(iter(pruner.modules.values()))
    first.weight.grad[0, 0] = float("inf")  # what an fp16 overflow leaves before the scaler skips the step
    pruner.before_optimizer_step()
    after = pruner.method.state_dict()["scores"]
    assert all(torch.equal(before[n], after[n]) for n in before)
    first.weight.grad[0, 0] = 0.0
    pruner.before_optimizer_step()  # finite: scored
    assert any(not torch.equal(before[n], pruner.method.state_dict()["scores"][n]) for n in before)
    assert all(torch.isfinite(s).all() for s in pruner.method.state_dict()["scores"].values())


def test_a_skipped_step_does_not_advance_the_schedule():
    _, skipped = movement_pruner()
    _, reference = movement_pruner()
    for step in range(1, 6):
        reference.update(step)
    for step in range(1, 7):  # one more optimizer step taken, the third one skipped by the scaler
        if step == 3:
            skipped.skip_step()
        changed = skipped.update(step)
        assert changed is (step != 3)
    assert skipped.scheduled_sparsity == reference.scheduled_sparsity
    assert skipped.state_dict()["skipped_steps"] == 1


def test_a_tied_lm_head_is_pruned_once_and_stays_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_gpt2
    from hf_prune import Pruner

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    # `lm_head` is a Linear, the embedding is not: both names reach the one tied tensor.
    config = PruningConfig(target_sparsity=0.5, targets=[r"lm_head", r"h\.\d+\.mlp"], warmup_fraction=0.0,
                           cooldown_fraction=0.0)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    weight = model.lm_head.weight
    assert model.transformer.wte.weight is weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)  # once, not 0.75 from two masks
    model.save_pretrained(str(tmp_path / "lm"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm"))
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    assert torch.equal(reloaded.transformer.wte.weight, weight)


def test_two_targeted_modules_sharing_one_weight_prune_it_once():
    from hf_prune import Pruner

    model = tiny_bert()
    layers = model.bert.encoder.layer
    layers[1].intermediate.dense.weight = layers[0].intermediate.dense.weight  # tied, as some checkpoints do
    pruner = Pruner(model, PruningConfig(target_sparsity=0.5, scope="local"))
    assert "bert.encoder.layer.0.intermediate.dense" in pruner.modules
    assert "bert.encoder.layer.1.intermediate.dense" not in pruner.modules
    pruner.start(10)
    pruner.prune_to(0.5)
    shared = layers[0].intermediate.dense.weight
    assert (shared == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert layers[1].intermediate.dense.weight is shared


def test_skipped_steps_survive_a_resume():
    _, pruner = movement_pruner()
    pruner.skip_step()
    pruner.update(1)
    _, resumed = movement_pruner()
    resumed.load_state_dict(pruner.state_dict())
    assert resumed.skipped_steps == 1


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_a_step_the_real_grad_scaler_skips_is_not_a_pruning_step(tmp_path, optim):
    """The real chain under fp16: Trainer, accelerate's optimizer wrapper and torch's GradScaler. accelerate refuses
    fp16 without an accelerator, so the scaler (torch's CPU GradScaler) is given to Trainer's accelerator directly;
    the overflow is made real by a loss that is inf at step 3, which the scaler must skip. A fused AdamW (the default
    optimizer) skips inside its own step, where accelerate's `step_was_skipped` does not see it."""
    torch.manual_seed(0)
    calls = {"n": 0}

    def loss_overflowing_at_step_3(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels)
        return loss * float("inf") if calls["n"] == 3 else loss

    config = PruningConfig(method="movement", target_sparsity=0.5, warmup_fraction=0.0, cooldown_fraction=0.0,
                           pruning_interval=1)
    callback = hf_prune.MovementPruningCallback(config)
    trainer = Trainer(model=tiny_bert(dropout=0.0), args=training_args(tmp_path, max_steps=8, max_grad_norm=0.0, optim=optim),
                      train_dataset=random_classification_data(), callbacks=[callback],
                      compute_loss_func=loss_overflowing_at_step_3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.accelerator.scaler = scaler
    sparsity_at = {}

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sparsity_at[state.global_step] = callback.pruner.scheduled_sparsity

    trainer.add_callback(Record())
    trainer.train()
    pruner = callback.pruner
    assert pruner.check_finite_gradients  # turned on by the scaler on the optimizer, not by args.fp16 alone
    assert trainer.optimizer.scaler is scaler and scaler.get_scale() == 2.0**7  # halved once: one real skip
    assert pruner.skipped_steps == 1
    assert sparsity_at[3] == sparsity_at[2]  # the skipped step did not advance the schedule
    assert sparsity_at[4] > sparsity_at[3]
    assert all(torch.isfinite(s).all() for s in pruner.scores.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
