"""hf_prune.commands.benchmark without ONNX: FLOP counting, argument checks, and a PyTorch-only run end to end."""

import json

import pytest
import torch
import transformers

from hf_prune import prune_ffn_neurons, prune_heads
from hf_prune.commands.benchmark import BenchmarkArguments, format_report, label_ids, run_benchmark
from hf_prune.flops import encoder_flops

from conftest import save_two_label_checkpoints, tiny_bert, tiny_tokenizer, write_csv


@pytest.fixture(scope="module")
def two_label_checkpoints(tmp_path_factory):
    return save_two_label_checkpoints(tmp_path_factory.mktemp("two_labels"))


def small_args(root, tmp_path, **kwargs):
    return BenchmarkArguments(checkpoints=[str(root / "dense"), str(root / "pruned")], output_dir=str(tmp_path / "out"),
                              runtimes=["pytorch"], batch_sizes=[1, 8], rounds=1, repeats=2, threads=1, **kwargs)


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
        ({"eval_file": "data.xlsx"}, "eval_file"),
        ({"eval_file": "missing.csv"}, "eval_file"),
        ({"text_columns": ["a", "b", "c"]}, "text_columns"),
        ({"label_column": ""}, "label_column"),
    ],
)
def test_bad_arguments_name_the_option(kwargs, option, tmp_path):
    args = {"checkpoints": [str(tmp_path)], **kwargs}
    with pytest.raises(ValueError, match=option):
        BenchmarkArguments(**args)


def test_pytorch_only_benchmark_end_to_end_on_a_csv_with_string_labels(two_label_checkpoints, tmp_path):
    texts = ["good day", "bad service", "great food", "awful day", "not good", "very bad", "the food", "good service"]
    labels = ["positive", "negative", "positive", "negative", "negative", "negative", "positive", "positive"]
    eval_file = write_csv(tmp_path / "eval.csv", [(t, y) for t, y in zip(texts * 3, labels * 3)])
    args = small_args(two_label_checkpoints, tmp_path, eval_file=eval_file, eval_size=20)
    results = run_benchmark(args)
    rows = results["rows"]
    assert [(r["name"], r["runtime"]) for r in rows] == [("dense", "pytorch"), ("pruned", "pytorch")]
    assert rows[0]["flop_ratio_limit"] == pytest.approx(1.0)
    assert rows[1]["flop_ratio_limit"] == pytest.approx(2.0)  # half of every projection, FFN and attention
    assert rows[1]["parameters"] < rows[0]["parameters"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
    settings = results["settings"]
    assert (settings["num_labels"], settings["eval_examples"], settings["text_columns"]) == (2, 20, ["text"])
    assert settings["eval_data"] == "eval.csv" and settings["timing_inputs"] == "eval data"
    saved = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    markdown = (tmp_path / "out" / "benchmark.md").read_text()
    assert format_report(results) == markdown and "eval.csv (20 examples scored)" in markdown
    assert torch.get_num_threads() == 1  # restored to what the test session set


def test_accuracy_is_scored_against_the_mapped_labels(two_label_checkpoints, tmp_path):
    """A model that always answers one class scores exactly that class's share, whichever form the labels take."""
    import datasets

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(two_label_checkpoints / "dense")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(two_label_checkpoints / "dense")
    encoded = tokenizer(["good day"], padding="max_length", max_length=64, return_tensors="pt")  # as benchmarked
    with torch.no_grad():
        answer = int(model(**encoded).logits.argmax(-1))
    # Every text is the same, so every prediction is `answer`; 3 of the 4 labels are `answer`.
    names = [model.config.id2label[answer]] * 3 + [model.config.id2label[1 - answer]]
    for labels in (names, [model.config.label2id[n] for n in names]):
        data = datasets.Dataset.from_dict({"sentence": ["good day"] * 4, "label": labels})
        results = run_benchmark(small_args(two_label_checkpoints, tmp_path, eval_size=4), eval_dataset=data)
        assert results["rows"][0]["accuracy"] == pytest.approx(0.75)
        assert results["settings"]["text_columns"] == ["sentence"]


def test_sentence_pairs_and_fewer_rows_than_the_largest_batch(two_label_checkpoints, tmp_path):
    eval_file = tmp_path / "pairs.jsonl"
    eval_file.write_text("\n".join(json.dumps({"sentence1": a, "sentence2": b, "gold": y})
                                   for a, b, y in [("good day", "great day", 1), ("bad food", "good food", 0),
                                                   ("the service", "awful service", 0)]) + "\n")
    args = small_args(two_label_checkpoints, tmp_path, eval_file=str(eval_file), label_column="gold", eval_size=50)
    results = run_benchmark(args)  # 3 rows: all scored, and repeated to fill the batch of 8
    assert results["settings"]["text_columns"] == ["sentence1", "sentence2"]
    assert results["settings"]["eval_examples"] == 3
    assert all(r["p50_ms_b8"] > 0 for r in results["rows"])


def test_unknown_string_label_names_the_value_and_the_known_labels(two_label_checkpoints, tmp_path):
    eval_file = write_csv(tmp_path / "eval.csv", [("good day", "positive"), ("bad day", "neutral")])
    with pytest.raises(ValueError, match=r"'neutral'.*\['negative', 'positive'\]"):
        run_benchmark(small_args(two_label_checkpoints, tmp_path, eval_file=eval_file))
    assert not (tmp_path / "out").exists()  # refused before any arm was built or written


def test_out_of_range_integer_label_names_the_value(two_label_checkpoints, tmp_path):
    eval_file = write_csv(tmp_path / "eval.csv", [("good day", 1), ("bad day", 0), ("the day", 2)])
    with pytest.raises(ValueError, match=r"Label 2 .*out of range.*num_labels=2"):
        run_benchmark(small_args(two_label_checkpoints, tmp_path, eval_file=eval_file))


def test_missing_columns_are_named(two_label_checkpoints, tmp_path):
    eval_file = write_csv(tmp_path / "eval.csv", [("good day", 1)], header=("review", "label"))
    with pytest.raises(ValueError, match="text_columns"):
        run_benchmark(small_args(two_label_checkpoints, tmp_path, eval_file=eval_file))
    with pytest.raises(ValueError, match="'stars'"):
        run_benchmark(small_args(two_label_checkpoints, tmp_path, eval_file=eval_file, text_columns=["review"],
                                 label_column="stars"))


def test_missing_eval_data_raises_and_eval_size_zero_times_synthetic_inputs(two_label_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="eval_dataset.*eval_file"):
        run_benchmark(small_args(two_label_checkpoints, tmp_path))
    results = run_benchmark(small_args(two_label_checkpoints, tmp_path, eval_size=0))
    assert all("accuracy" not in r for r in results["rows"])
    assert results["settings"]["timing_inputs"] == "synthetic"
    assert "no accuracy" in format_report(results)


def test_checkpoints_with_different_label_counts_are_refused(two_label_checkpoints, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "vocab")
    tiny_bert(num_labels=3, vocab_size=tokenizer.vocab_size).save_pretrained(tmp_path / "three")
    args = BenchmarkArguments(checkpoints=[str(two_label_checkpoints / "dense"), str(tmp_path / "three")],
                              runtimes=["pytorch"], eval_size=0, output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="num_labels=3"):
        run_benchmark(args)


def test_class_label_ids_follow_the_model_label_names():
    import datasets

    config = transformers.BertConfig(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    features = datasets.Features({"label": datasets.ClassLabel(names=["pos", "neg"])})  # the other order
    data = datasets.Dataset.from_dict({"label": [0, 1, 1]}, features=features)
    assert label_ids(data, "label", config).tolist() == [1, 0, 0]
