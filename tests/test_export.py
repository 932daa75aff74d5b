"""export_onnx, create_session and the `hf-prune export` / `benchmark` commands, with the real Optimum exporter,
ORTOptimizer, ORTQuantizer and ONNX Runtime sessions, on tiny models with pruned heads and per-layer FFN sizes."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("optimum.onnxruntime")
ort = pytest.importorskip("onnxruntime")

from hf_prune import (  # noqa: E402
    ExportResult,
    ExportVerificationError,
    create_session,
    export_onnx,
    prune_ffn_neurons,
    prune_heads,
    save_pruned,
)
from hf_prune.cli import main  # noqa: E402
from hf_prune.export import write_sparse_initializers  # noqa: E402

from conftest import (  # noqa: E402
    build_model,
    random_classification_data,
    requires_packaged_assets,
    tiny_bert,
    tiny_tokenizer,
    training_args,
    write_csv,
)

pytestmark = pytest.mark.onnx

ARCHS = ["bert", "roberta", "distilbert", "gpt2"]


def pruned_model(arch: str):
    """Non-uniform heads (layer 1 loses every head) and different FFN widths per layer."""
    model = build_model(arch)
    prune_heads(model, {0: [0, 2], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {0: list(range(10)), 1: list(range(30))})
    return model


def random_feed(session, vocab: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    feed = {}
    for node in session.get_inputs():
        if node.name == "input_ids":
            feed[node.name] = ids
        elif node.name == "attention_mask":
            feed[node.name] = mask
        elif node.name == "token_type_ids":
            feed[node.name] = np.zeros_like(ids)
        elif node.name == "position_ids":
            feed[node.name] = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int64)
    return feed


def torch_logits(model, feed: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_with_pruned_heads_matches_pytorch(arch, tmp_path):
    model = pruned_model(arch)
    params_before = sum(p.numel() for p in model.parameters())
    result = export_onnx(model, tmp_path / "onnx", quantize="dynamic")

    assert set(result.files) == {"fp32", "optimized", "int8"}
    for variant in ("fp32", "optimized"):
        assert result.max_abs_diff[variant] <= 1e-4
    assert result.max_abs_diff["int8"] <= result.tolerance["int8"]
    assert result.argmax_agreement["int8"] >= 0.75
    assert result.optimization["applied"] == "O2"  # the default level, kept: no fallback
    assert result.structure["heads_per_layer"] == [2, 0]
    assert sum(p.numel() for p in model.parameters()) == params_before  # the caller's model is not modified
    if arch == "gpt2":
        assert result.task == "text-generation"
        assert any("key/value cache" in note for note in result.notes)
    else:
        assert result.task == "text-classification"

    # An independent check on inputs the export never saw, for every file written.
    for variant, name in result.files.items():
        session = ort.InferenceSession(str(tmp_path / "onnx" / name), providers=["CPUExecutionProvider"])
        feed = random_feed(session, model.config.vocab_size)
        got = session.run(["logits"], feed)[0]
        expected = torch_logits(model, feed)
        limit = result.tolerance["int8"] if variant == "int8" else 1e-4
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= limit, variant

    report = ExportResult.from_dir(tmp_path / "onnx")
    assert report.files == result.files and report.max_abs_diff == result.max_abs_diff


def test_export_from_pruned_checkpoint_rebuilds_shapes(tmp_path):
    model = pruned_model("bert")
    save_pruned(model, str(tmp_path / "ckpt"))
    result = export_onnx(str(tmp_path / "ckpt"), tmp_path / "onnx", optimize="O1")
    assert result.structure["intermediate_sizes"] == [54, 34]
    assert (tmp_path / "onnx" / "hf_prune_structure.json").is_file()
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model_optimized.onnx"), providers=["CPUExecutionProvider"])
    feed = random_feed(session, 100)
    assert np.max(np.abs(session.run(["logits"], feed)[0] - torch_logits(model, feed))) <= 1e-4


def test_remove_structures_drops_zeroed_heads_and_neurons(tmp_path):
    model = build_model("bert")
    with torch.no_grad():
        attention = model.bert.encoder.layer[0].attention
        head = slice(8, 16)  # head 1 of 4, head_dim 8
        for proj in (attention.self.query, attention.self.key, attention.self.value):
            proj.weight[head] = 0
            proj.bias[head] = 0
        attention.output.dense.weight[:, head] = 0
        ffn = model.bert.encoder.layer[1]
        ffn.intermediate.dense.weight[:5] = 0
        ffn.intermediate.dense.bias[:5] = 0
        ffn.output.dense.weight[:, :5] = 0
    result = export_onnx(model, tmp_path / "onnx", optimize=None, remove_structures=True)
    assert result.removed_structures["heads"] == {0: [1]}
    assert result.removed_structures["neurons"] == {1: [0, 1, 2, 3, 4]}
    assert result.structure["heads_per_layer"] == [3, 4]
    assert result.structure["intermediate_sizes"] == [64, 59]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = random_feed(session, 100)
    assert np.max(np.abs(session.run(["logits"], feed)[0] - torch_logits(model, feed))) <= 1e-4


def test_unstructured_sparsity_is_stored_as_smaller_sparse_initializers(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    keep = torch.rand_like(module.weight) < 0.1
                    module.weight.mul_(keep)
    sparse = export_onnx(model, tmp_path / "sparse", optimize=None, quantize="dynamic")
    dense = export_onnx(model, tmp_path / "dense", optimize=None, sparse_initializers="never")

    assert sparse.sparse_initializers["fp32"]["converted"] == 12  # 6 Linear weights per layer
    assert sparse.sizes_bytes["fp32"] < 0.75 * dense.sizes_bytes["fp32"]
    assert dense.sparse_initializers == {}
    assert any("no speedup" in note for note in sparse.notes)
    # ONNX Runtime reads the sparse file and gives the same outputs as PyTorch.
    session = ort.InferenceSession(str(tmp_path / "sparse" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = random_feed(session, 100)
    assert np.max(np.abs(session.run(["logits"], feed)[0] - torch_logits(model, feed))) <= 1e-4


def test_sparse_initializers_leave_dense_weights_alone(tmp_path):
    export_onnx(build_model("bert"), tmp_path / "onnx", optimize=None, sparse_initializers="never")
    path = tmp_path / "onnx" / "model.onnx"
    size = path.stat().st_size
    summary = write_sparse_initializers(path, min_elements=16)
    assert summary["converted"] == 0 and path.stat().st_size == size


def test_failed_export_keeps_the_previous_export(tmp_path):
    out = tmp_path / "onnx"
    export_onnx(build_model("bert"), out, optimize=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportVerificationError, match="quantized_tolerance"):
        export_onnx(build_model("bert", seed=1), out, optimize=None, quantize="dynamic", quantized_tolerance=0.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no staging directory left behind


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(build_model("bert"), out, optimize=None)
    assert (out / "notes.txt").read_text() == "keep me"
    export_onnx(build_model("bert"), out, optimize=None, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.onnx").is_file()


def test_optimization_falls_back_and_says_so(tmp_path):
    # ConvBERT exports through Optimum but ORTOptimizer has no fusion rules for it: every level fails, the plain
    # graph is served, and the report says why.
    config = transformers.ConvBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, embedding_size=32, max_position_embeddings=64,
                                         num_labels=3)
    model = transformers.ConvBertForSequenceClassification(config).eval()
    result = export_onnx(model, tmp_path / "onnx", optimize="O2")
    assert result.optimization["applied"] is None
    assert [a["level"] for a in result.optimization["attempts"]] == ["O2", "O1"]
    assert "optimized" not in result.files
    assert any("graph optimisation failed" in note for note in result.notes)
    assert result.max_abs_diff["fp32"] <= 1e-4


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"optimize": "O4"}, "optimize"),
        ({"optimize": "fast"}, "optimize"),
        ({"quantize": "static"}, "quantize"),
        ({"sparse_initializers": "yes"}, "sparse_initializers"),
        ({"tolerance": -1.0}, "tolerance"),
    ],
)
def test_bad_options_fail_early_and_name_the_option(kwargs, option, tmp_path):
    with pytest.raises(ValueError, match=option):
        export_onnx(build_model("bert"), tmp_path / "onnx", **kwargs)
    assert not (tmp_path / "onnx").exists()


@pytest.fixture(scope="module")
def classifier_pair_dir(tmp_path_factory):
    """A tiny BERT classifier with a small local WordPiece tokenizer, pruned and saved with its tokenizer."""
    root = tmp_path_factory.mktemp("classifiers")
    tokenizer = tiny_tokenizer(root / "vocab")
    dense = tiny_bert(vocab_size=tokenizer.vocab_size, max_position_embeddings=128).eval()
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    pruned = tiny_bert(vocab_size=tokenizer.vocab_size, max_position_embeddings=128).eval()
    pruned.load_state_dict(dense.state_dict())
    prune_heads(pruned, {0: [0, 1], 1: [3]})
    prune_ffn_neurons(pruned, {0: list(range(32)), 1: list(range(32))})
    save_pruned(pruned, str(root / "pruned"))
    tokenizer.save_pretrained(root / "pruned")
    return root


def test_create_session_serves_a_pipeline(classifier_pair_dir, tmp_path):
    from transformers import AutoTokenizer, pipeline

    export_onnx(str(classifier_pair_dir / "pruned"), tmp_path / "onnx", quantize="dynamic")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "onnx")
    served = create_session(tmp_path / "onnx", threads=1)
    assert served.hf_prune_session["variant"] == "int8"
    assert served.hf_prune_session["threads"] == 1
    texts = ["great day", "awful service"]
    predictions = pipeline("text-classification", model=served, tokenizer=tokenizer)(texts)
    # What the pipeline reports is the INT8 session's own answer, text by text.
    for text, prediction in zip(texts, predictions):
        probabilities = served(**tokenizer([text], return_tensors="pt")).logits.softmax(-1)[0]
        assert prediction["label"] == f"LABEL_{int(probabilities.argmax())}"
        assert prediction["score"] == pytest.approx(float(probabilities.max()), abs=1e-6)

    fp32 = create_session(tmp_path / "onnx", "fp32")
    from hf_prune import load_pruned

    reference = load_pruned(str(classifier_pair_dir / "pruned"))
    encoded = tokenizer(["great day", "awful service, never again"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**encoded).logits
    assert torch.allclose(fp32(**encoded).logits, expected, atol=1e-4)

    with pytest.raises(ValueError, match="variant"):
        create_session(tmp_path / "onnx", "fp16")
    with pytest.raises(FileNotFoundError, match="hf_prune_export.json"):
        create_session(classifier_pair_dir / "pruned")


def test_cli_export(classifier_pair_dir, tmp_path, capsys):
    assert main(["export", str(classifier_pair_dir / "pruned"), str(tmp_path / "onnx"), "--quantize", "dynamic"]) == 0
    out = capsys.readouterr().out
    assert "model_quantized.onnx" in out and "max |ORT - PyTorch|" in out
    report = json.loads((tmp_path / "onnx" / "hf_prune_export.json").read_text())
    assert report["files"]["int8"] == "model_quantized.onnx"
    with pytest.raises(SystemExit):
        main(["export", str(classifier_pair_dir / "pruned"), str(tmp_path / "x"), "--optimize", "O9"])
    err = capsys.readouterr().err
    assert "--optimize" in err and "O9" in err and "O2" in err
    assert not (tmp_path / "x").exists()


def test_cli_benchmark_writes_json_markdown_and_plot(classifier_pair_dir, tmp_path):
    out = tmp_path / "bench"
    words = ["good", "bad", "great", "awful", "day", "service", "food", "not", "very", "the"]
    texts = [f"{words[i % 10]} {words[(3 * i) % 10]} {words[(7 * i + 1) % 10]}" for i in range(64)]
    eval_file = write_csv(tmp_path / "eval.csv", [(text, i % 3) for i, text in enumerate(texts)],
                          header=("review", "stars"))
    argv = ["benchmark", str(classifier_pair_dir / "dense"), str(classifier_pair_dir / "pruned"), "--output_dir", str(out),
            "--eval_file", eval_file, "--text_columns", "review", "--label_column", "stars", "--eval_size", "64",
            "--rounds", "1", "--repeats", "2", "--batch_sizes", "1", "4", "--threads", "1"]
    assert main(argv) == 0
    results = json.loads((out / "benchmark.json").read_text())
    rows = results["rows"]
    assert [(r["name"], r["runtime"], r["precision"]) for r in rows] == [
        (name, runtime, precision)
        for name in ("dense", "pruned")
        for runtime, precision in (("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp32 O2"),
                                   ("onnxruntime", "int8"))
    ]
    for row in rows:
        base = rows[0] if row["runtime"] == "pytorch" else rows[1]  # each runtime is compared with its dense fp32
        for b in (1, 4):
            assert 0 < row[f"p50_ms_b{b}"] <= row[f"p90_ms_b{b}"], (row["precision"], b)
            assert row[f"speedup_b{b}"] == pytest.approx(base[f"p50_ms_b{b}"] / row[f"p50_ms_b{b}"])
        # 1 round x 2 repeats: the median is the mean of the two timings, which the throughput is computed from.
        assert row["throughput_per_s"] == pytest.approx(4000 / row["p50_ms_b4"])
        assert row["accuracy"] * 64 == pytest.approx(round(row["accuracy"] * 64))  # a count out of 64 examples
        assert row["accuracy_delta_points"] == pytest.approx((row["accuracy"] - base["accuracy"]) * 100)
        if row["runtime"] == "onnxruntime":
            assert row["size_mb"] == os.path.getsize(row["onnx_file"]) / 1e6
    assert rows[0]["size_mb"] == (classifier_pair_dir / "dense" / "model.safetensors").stat().st_size / 1e6
    assert rows[4]["size_mb"] == (classifier_pair_dir / "pruned" / "model.safetensors").stat().st_size / 1e6
    # fp32 arms of one checkpoint predict alike, whatever the runtime or graph.
    for first, last in ((0, 3), (4, 7)):
        assert len({(r["accuracy"], r["macro_f1"]) for r in rows[first:last]}) == 1
    # The PyTorch arm's accuracy is the dense model's on the 64 rows of the eval file.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_prune.metrics import classification_metrics

    tokenizer = AutoTokenizer.from_pretrained(classifier_pair_dir / "dense")
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        dense = AutoModelForSequenceClassification.from_pretrained(classifier_pair_dir / "dense").eval()
        predictions = dense(**encoded).logits.argmax(-1).numpy()
    expected = classification_metrics(predictions, [i % 3 for i in range(64)], num_labels=3)
    assert (rows[0]["accuracy"], rows[0]["macro_f1"]) == pytest.approx((expected["accuracy"], expected["macro_f1"]))
    assert rows[0]["speedup_b4"] == pytest.approx(1.0) and rows[0]["flop_ratio_limit"] == pytest.approx(1.0)
    assert rows[1]["speedup_b4"] == pytest.approx(1.0)  # ONNX Runtime arms are compared with dense in ONNX Runtime
    # Layer 0 keeps 2 of 4 heads, layer 1 3 of 4, both half their FFN: at seq_len 64, 3145728 / 1835008 FLOPs.
    assert rows[4]["flop_ratio_limit"] == pytest.approx(12 / 7)
    assert rows[4]["parameters"] < rows[0]["parameters"]
    assert rows[3]["size_mb"] < rows[1]["size_mb"]  # INT8 graph is smaller than fp32
    assert (results["settings"]["num_labels"], results["settings"]["eval_examples"]) == (3, 64)
    markdown = (out / "benchmark.md").read_text()
    assert "eval.csv (64 examples scored)" in markdown
    assert "| dense | pytorch fp32 |" in markdown and "| pruned | onnxruntime int8 |" in markdown
    assert "| pruned | onnxruntime fp32 O2 |" in markdown
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_benchmark_rejects_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        main(["benchmark", str(tmp_path / "missing")])


@pytest.mark.slow
@requires_packaged_assets
def test_packaged_minilm_structurally_pruned_exports_and_serves(tmp_path):
    """The real MiniLM, heads and FFN neurons removed unevenly, through the CLI and into a pipeline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from hf_prune.recipes.packaged import packaged_model_path

    path = packaged_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    prune_heads(model, {i: list(range(i + 2)) for i in range(6)})
    prune_ffn_neurons(model, {i: list(range(0, 1536, 2 + i)) for i in range(6)})
    save_pruned(model, str(tmp_path / "ckpt"))
    tokenizer.save_pretrained(tmp_path / "ckpt")

    cwd_before = sorted(os.listdir(os.getcwd()))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "onnx"), "--quantize", "dynamic"]) == 0
    assert sorted(os.listdir(os.getcwd())) == cwd_before  # no ONNX Runtime leftovers in the working directory
    report = ExportResult.from_dir(tmp_path / "onnx")
    assert report.max_abs_diff["optimized"] <= 1e-4
    assert report.optimization["applied"] == "O2"
    assert report.structure["heads_per_layer"] == [10, 9, 8, 7, 6, 5]
    assert report.sizes_bytes["int8"] < report.sizes_bytes["optimized"] / 3

    texts = ["what a lovely morning", "my flight got cancelled again", "the meeting is at noon"]
    served = create_session(tmp_path / "onnx", "optimized")
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded).logits
    assert torch.allclose(served(**encoded).logits, expected, atol=1e-4)
    classify = pipeline("text-classification", model=served, tokenizer=tokenizer)
    assert [p["label"] for p in classify(texts)] == [model.config.id2label[i] for i in expected.argmax(-1).tolist()]
    # The default session is INT8; a random classifier head's logits are too close to compare argmaxes across it,
    # but they stay within the tolerance the export verified, and the pipeline reports the session's own argmax.
    int8_session = create_session(tmp_path / "onnx")
    assert int8_session.hf_prune_session["variant"] == "int8"
    int8_logits = int8_session(**encoded).logits
    assert float((int8_logits - expected).abs().max()) <= report.tolerance["int8"]
    int8 = pipeline("text-classification", model=int8_session, tokenizer=tokenizer)
    assert [p["label"] for p in int8(texts)] == [model.config.id2label[i] for i in int8_logits.argmax(-1).tolist()]


@pytest.fixture(scope="module")
def packaged_minilm_checkpoint(tmp_path_factory):
    """The packaged MiniLM with a 3-way classification head, saved with its tokenizer (nothing pruned)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_prune.recipes.packaged import packaged_model_path

    path = packaged_model_path()
    checkpoint = tmp_path_factory.mktemp("minilm") / "ckpt"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(path).save_pretrained(checkpoint)
    return checkpoint


@pytest.mark.slow
@requires_packaged_assets
@pytest.mark.parametrize("cwd", ["invocation", "fresh"])
def test_packaged_minilm_int8_export_leaves_the_working_directory_alone(cwd, packaged_minilm_checkpoint, tmp_path,
                                                                         monkeypatch):
    """ONNX Runtime's symbolic shape inference saves sym_shape_infer_temp.onnx and <uuid>.data files into the working
    directory when it gives up (three such files were once committed); an INT8 export must leave no such trace."""
    if cwd == "fresh":
        (tmp_path / "cwd").mkdir()
        monkeypatch.chdir(tmp_path / "cwd")
    before = sorted(os.listdir(os.getcwd()))

    result = export_onnx(str(packaged_minilm_checkpoint), tmp_path / "onnx", quantize="dynamic")

    assert sorted(os.listdir(os.getcwd())) == before
    if cwd == "fresh":
        assert before == []
    assert sorted(p.name for p in tmp_path.iterdir()) == (["cwd", "onnx"] if cwd == "fresh" else ["onnx"])
    assert set(result.files) == {"fp32", "optimized", "int8"}
    assert result.max_abs_diff["fp32"] <= 1e-4 and result.max_abs_diff["optimized"] <= 1e-4
    assert result.max_abs_diff["int8"] <= result.tolerance["int8"]
    assert result.sizes_bytes["int8"] < result.sizes_bytes["fp32"] / 3
    assert (tmp_path / "onnx" / result.files["int8"]).stat().st_size == result.sizes_bytes["int8"]


def test_exports_a_model_that_went_through_a_mixed_precision_trainer(tmp_path):
    # accelerate wraps the forward of a model a bf16 Trainer prepares (ConvertOutputsToFp32), which the ONNX tracer
    # cannot read; hf-prune optimize exports candidate copies of a model a Trainer has scored.
    model = tiny_bert(num_labels=3)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "run", bf16=True, max_steps=1),
                                   train_dataset=random_classification_data())
    trainer.train()
    result = export_onnx(model.float(), tmp_path / "onnx", optimize=None)
    assert result.max_abs_diff["fp32"] <= 1e-4
