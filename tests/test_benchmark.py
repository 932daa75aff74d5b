"""hf_prune.benchmark without ONNX: FLOP counting, argument checks, and a PyTorch-only run end to end."""

import json

import pytest
import torch
import transformers

from hf_prune import prune_ffn_neurons, prune_heads, save_pruned
from hf_prune.benchmark import BenchmarkArguments, encoder_flops, format_markdown, run_benchmark


def tiny_bert(vocab_size: int = 100) -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def test_encoder_flops_counts_projections_ffn_and_attention():
    model = tiny_bert()
    seq = 16
    per_layer = seq * (2 * 4 * 32 * 32 + 2 * 2 * 32 * 64) + 2 * 2 * seq * seq * 32
    assert encoder_flops(model, seq) == 2 * per_layer

    prune_heads(model, {0: [0, 1], 1: [0, 1, 2, 3]})  # layer 0 keeps 2 heads (width 16), layer 1 none
    prune_ffn_neurons(model, {1: list(range(32))})
    layer0 = seq * (2 * 4 * 32 * 16 + 2 * 2 * 32 * 64) + 2 * 2 * seq * seq * 16
    layer1 = seq * (2 * 2 * 32 * 32)
    assert encoder_flops(model, seq) == layer0 + layer1


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"checkpoints": []}, "checkpoints"),
        ({"runtimes": ["tensorrt"]}, "runtimes"),
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"rounds": 0}, "rounds"),
        ({"eval_size": -1}, "eval_size"),
        ({"names": ["a", "b"]}, "names"),
    ],
)
def test_bad_arguments_name_the_option(kwargs, option, tmp_path):
    args = {"checkpoints": [str(tmp_path)], **kwargs}
    with pytest.raises(ValueError, match=option):
        BenchmarkArguments(**args)


def test_pytorch_only_benchmark_end_to_end(tmp_path):
    from transformers import AutoTokenizer

    from hf_prune.data import packaged_model_path

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path())
    dense = tiny_bert(tokenizer.vocab_size)
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    pruned = tiny_bert(tokenizer.vocab_size)
    prune_heads(pruned, {0: [0, 1], 1: [0, 1]})
    prune_ffn_neurons(pruned, {0: list(range(32)), 1: list(range(32))})
    save_pruned(pruned, str(tmp_path / "pruned"))

    args = BenchmarkArguments(checkpoints=[str(tmp_path / "dense"), str(tmp_path / "pruned")],
                              output_dir=str(tmp_path / "out"), runtimes=["pytorch"], batch_sizes=[1, 8],
                              rounds=1, repeats=2, eval_size=40, threads=1)
    results = run_benchmark(args)
    rows = results["rows"]
    assert [(r["name"], r["runtime"]) for r in rows] == [("dense", "pytorch"), ("pruned", "pytorch")]
    assert rows[0]["flop_ratio_limit"] == pytest.approx(1.0)
    assert rows[1]["flop_ratio_limit"] == pytest.approx(2.0)  # half of every projection, FFN and attention
    assert rows[1]["parameters"] < rows[0]["parameters"]
    assert 0.0 <= rows[1]["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert format_markdown(results) == (tmp_path / "out" / "benchmark.md").read_text()
    assert torch.get_num_threads() == 1  # restored to what the test session set
