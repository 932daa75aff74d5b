"""Work that must never be lost: each test here failed before its fix (issue 15)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune as torch_prune
from transformers import AutoModelForSequenceClassification, Trainer

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
