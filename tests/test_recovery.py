"""Recovery after one-shot pruning: the one-shot zeros kept fixed while fine-tuning (method="constant"), through
PruningTrainer, a plain Trainer with a callback and TRL's SFTTrainer; and Wanda as a gradual criterion."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer

from conftest import tiny_causal_lm, tiny_tokenizer, training_args
from hf_prune import (ConstantPruningCallback, MagnitudePruningCallback, PruningCallback, PruningConfig,
                      PruningTrainer, oneshot)
from hf_prune.masks import find_target_modules


def lm_data(n: int = 32, length: int = 12, vocab: int = 128, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=generator)
    ids[:, 1::2] = ids[:, 0::2] % 7 + 5  # something to learn
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                              "labels": ids.tolist()})


def pruned_model(arch: str = "llama", pattern: str = "2:4"):
    model = tiny_causal_lm(arch)
    batches = [{"input_ids": torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    oneshot(model, batches, method="wanda", pattern=pattern, show_progress=False)
    return model


def zeros_of(model) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0).clone() for n, m in find_target_modules(model, PruningConfig().targets).items()}


def assert_kept_and_trained(model, before_zeros, before_weights):
    for name, module in find_target_modules(model, PruningConfig().targets).items():
        assert torch.equal(module.weight == 0, before_zeros[name]), name  # not one zero revived, none added
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before_weights[n])]
    assert changed, "training changed nothing"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_plain_trainer_with_the_constant_callback_keeps_the_oneshot_zeros(tmp_path, arch):
    model = pruned_model(arch)
    zeros = zeros_of(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = ConstantPruningCallback()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6, learning_rate=1e-2),
                      train_dataset=lm_data(), callbacks=[callback])
    trainer.train()
    assert_kept_and_trained(model, zeros, weights)
    assert callback.pruner.scheduled_sparsity == pytest.approx(0.5, abs=1e-3)
    trainer.save_model(str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert_kept_and_trained(reloaded, zeros, weights)


def test_pruning_trainer_keeps_the_oneshot_zeros_with_a_dense_teacher(tmp_path):
    teacher = tiny_causal_lm("llama")
    model = pruned_model("llama")
    zeros = zeros_of(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PruningTrainer(model=model, args=training_args(tmp_path, max_steps=6, learning_rate=1e-2),
                             train_dataset=lm_data(), pruning_config=PruningConfig(method="constant",
                                                                                   distillation_alpha=0.5),
                             teacher_model=teacher)
    trainer.train()
    assert_kept_and_trained(model, zeros, weights)


def test_the_callbacks_work_unchanged_under_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    data = lm_data().remove_columns(["labels"])  # pre-tokenized: the tokenizer only pads
    common = dict(output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, bf16=False,
                  seed=0)
    # Fixed one-shot masks while SFT fine-tunes.
    model = tiny_causal_lm("llama")
    oneshot(model, [torch.tensor(data["input_ids"][:8])], method="sparsegpt", sparsity=0.5, show_progress=False)
    zeros = zeros_of(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=data,
                             processing_class=tokenizer, callbacks=[ConstantPruningCallback()])
    trainer.train()
    assert_kept_and_trained(model, zeros, weights)
    # Gradual pruning during SFT: the scheduled target reached, the sparsity logged in Trainer's history.
    model = tiny_causal_lm("llama")
    config = PruningConfig(target_sparsity=0.5, warmup_fraction=0.0, cooldown_fraction=0.0)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=data,
                             processing_class=tokenizer, callbacks=[MagnitudePruningCallback(config)])
    trainer.train()
    zeros = zeros_of(model)
    assert sum(int(z.sum()) for z in zeros.values()) / sum(z.numel() for z in zeros.values()) == pytest.approx(0.5,
                                                                                                           abs=1e-3)
    assert any("sparsity" in entry for entry in trainer.state.log_history)


def test_wanda_as_a_gradual_criterion_reads_the_training_activations(tmp_path):
    model = tiny_causal_lm("llama")
    callback = PruningCallback(PruningConfig(method="wanda", target_sparsity=0.5, warmup_fraction=0.0,
                                             cooldown_fraction=0.0, pruning_interval=2))
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6), train_dataset=lm_data(),
                      callbacks=[callback])
    trainer.train()
    pruner = callback.pruner
    assert pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)
    state = pruner.method.state_dict()
    assert all(tokens == 6 * 8 * 12 for tokens in state["tokens"].values())  # every training token, no eval ones
    # The hooks that fed it are gone once training ends.
    assert all(not m._forward_pre_hooks for m in pruner.modules.values())
