"""Tiny models and data built from configs: fast, offline, and covering several architectures."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per process make them
# ~100x slower through contention.
torch.set_num_threads(1)


def tiny_bert(num_labels: int = 3, seed: int = 0, dropout: float = 0.1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def random_classification_data(n: int = 64, length: int = 16, num_labels: int = 3, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=generator)
    # Labels depend on the tokens so that training has something to learn.
    labels = (ids[:, 0] % num_labels).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels})


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def classification_data():
    return random_classification_data()
