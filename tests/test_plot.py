"""hf_prune.plot: every picture is a real PNG drawn from real pruning output (a tiny BERT pruned by `Pruner`, the log
history of a `PruningTrainer`, the `hf-prune train` job); bad input raises ValueError naming the argument; without
matplotlib every function warns once and returns None. Tests that need matplotlib skip where it is not installed."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from hf_prune import Pruner, PruningConfig, PruningTrainer, sparsity_report
from hf_prune.cli import main
from hf_prune.metrics import compute_metrics
from hf_prune.plot import (
    canvas,
    plot_accuracy_latency,
    plot_accuracy_vs_sparsity,
    plot_head_importance,
    plot_layer_sparsity,
    plot_lm_candidates,
    plot_schedule,
    plot_sensitivity,
    plot_sparsity_heatmap,
    plot_training,
    sparsity_by_layer,
)
from hf_prune.plot.canvas import signed_format
from hf_prune.plot.results import sensitivity_grid, short_names

from conftest import (
    ARCHS,
    WORDS,
    build_model,
    random_classification_data,
    tiny_bert,
    tiny_tokenizer,
    training_args,
    write_csv,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ATTENTION_AND_FFN = {"query", "key", "value", "attention output", "FFN in", "FFN out"}


def needs_matplotlib():
    return pytest.importorskip("matplotlib")


def assert_png(path, min_kb: float = 8.0) -> None:
    """A PNG file of at least `min_kb` KB whose pixels are not all one colour."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_kb * 1024, (path, len(data))
    from matplotlib.image import imread

    pixels = torch.from_numpy(imread(path))
    assert pixels.dim() == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert float(pixels[..., :3].std()) > 0.05


def pruned_bert(sparsity: float, scope: str = "global"):
    model = tiny_bert()
    Pruner(model, PruningConfig(target_sparsity=sparsity, scope=scope)).prune_to(sparsity)
    return model


def sensitivity_result():
    """What `hf_prune.sensitivity` serialises to: one row per (group, level)."""
    rows = []
    for layer in (1, 0):
        for kind in ("heads", "neurons"):
            for level in (0.25, 0.5, 0.75):
                rows.append({"group": f"layer {layer} {kind}", "kind": kind, "layer": layer, "level": level,
                             "metric": 0.8 - level * (0.1 if kind == "heads" else 0.3),
                             "delta": -level * (0.1 if kind == "heads" else 0.3) + 0.01 * layer, "params": 4096})
    rows.append({"group": "embeddings", "kind": "embeddings", "layer": None, "level": 0.5, "metric": 0.5,
                 "delta": -0.3, "params": 3200})
    return {"baseline": 0.8, "rows": rows}


def accuracy_rows():
    return [{"sparsity": s, "accuracy": a, "arm": arm}
            for arm, drop in (("magnitude", 0.3), ("movement", 0.1)) for seed in (0, 1)
            for s, a in ((0.0, 0.80), (0.5, 0.78 - 0.01 * seed), (0.9, 0.80 - drop + 0.01 * seed))]


def lm_report(speedups: bool = True, perplexities: bool = True):
    """The parts of an `hf-prune optimize` causal-LM report.json that plot_lm_candidates reads: candidates of every
    family, some recovered by the short search, one chosen; the dense and optimized models; both targets."""
    candidates = []
    for axes, step in (("heads+neurons", 0.1), ("hidden", 0.12), ("hidden+heads+neurons", 0.15), ("depth", 0.2),
                       ("depth+width", 0.18)):
        for k in (1, 2, 3):
            kept = 1 - step * k
            candidates.append({"axes": axes, "params_ratio": kept,
                               "decode_speedup": (1 / kept) if speedups else None,
                               "perplexity_after_cut": (20 / kept ** 4) if perplexities else None,
                               "perplexity_after_search": (20 / kept ** 2) if perplexities and k == 3 else None,
                               "chosen": axes == "hidden+heads+neurons" and k == 2})
    models = {"dense": {"params_ratio": 1.0, "perplexity": 20.0 if perplexities else None, "decode_speedup": 1.0},
              "optimized": {"params_ratio": 0.7, "perplexity": 24.0 if perplexities else None,
                            "decode_speedup": 1.4 if speedups else None}}
    return {"candidates": candidates, "models": models,
            "target": {"params": 0.7, "speedup": 1.4 if speedups else None}}


def benchmark_results():
    rows = [{"name": name, "runtime": runtime, "precision": precision, "accuracy": accuracy, "p50_ms_b4": ms}
            for name, accuracy, ms in (("dense", 0.80, 20.0), ("pruned", 0.78, 8.0))
            for runtime, precision in (("pytorch", "fp32"), ("onnxruntime", "int8"))]
    return {"settings": {"batch_sizes": [1, 4]}, "rows": rows}


# ------------------------------------------------------------------------------------------------ layer sparsity
def test_sparsity_by_layer_reads_types_from_bert_names_and_pools_counts():
    by_layer = sparsity_by_layer(sparsity_report(pruned_bert(0.5, scope="local")))
    assert by_layer == {layer: {kind: 0.5 for kind in ATTENTION_AND_FFN} for layer in (0, 1)}
    assert list(by_layer[0]) == ["query", "key", "value", "attention output", "FFN in", "FFN out"]


@pytest.mark.parametrize("arch", ARCHS)
def test_module_types_for_every_supported_architecture(arch):
    by_layer = sparsity_by_layer(build_model(arch))  # a model is measured with sparsity_report's defaults
    expected = {"query", "key", "value", "attention output", "FFN in", "FFN out"}
    if arch == "gpt2":
        expected = {"qkv", "attention output", "FFN in", "FFN out"}
    assert set(by_layer) == {0, 1}
    assert all(set(kinds) == expected for kinds in by_layer.values()), by_layer


def test_modules_outside_known_names_are_labelled_by_their_path():
    report = {"modules": {"encoder.block.0.SelfAttention.q": {"params": 10, "zeros": 5},
                          "encoder.block.0.layer.1.Mixer.wo": {"params": 10, "zeros": 0},
                          "classifier": {"params": 10, "zeros": 10}}}
    assert sparsity_by_layer(report) == {0: {"SelfAttention.q": 0.5, "layer.1.Mixer.wo": 0.0}}


def test_layer_sparsity_bars_and_heatmap_write_pngs(tmp_path):
    needs_matplotlib()
    model = pruned_bert(0.8)
    report = sparsity_report(model)
    assert plot_layer_sparsity(report, str(tmp_path / "bars.png")) == str(tmp_path / "bars.png")
    assert plot_sparsity_heatmap(model, str(tmp_path / "sub" / "heat.png")) == str(tmp_path / "sub" / "heat.png")
    assert_png(tmp_path / "bars.png")
    assert_png(tmp_path / "sub" / "heat.png")
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # drawn outside pyplot: nothing left open


@pytest.mark.parametrize("plot", [plot_layer_sparsity, plot_sparsity_heatmap])
@pytest.mark.parametrize("bad", [{}, {"modules": {}}, [], {"modules": {"classifier": {"params": 4, "zeros": 1}}}])
def test_layer_sparsity_refuses_reports_without_layer_modules(plot, bad, tmp_path):
    with pytest.raises(ValueError, match="report"):
        plot(bad, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------ heads
def test_head_importance_with_removed_heads_writes_a_png(tmp_path):
    needs_matplotlib()
    importance = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    path = plot_head_importance(importance, str(tmp_path / "heads.png"), removed={0: [1], "1": [0, 3]})
    assert path == str(tmp_path / "heads.png")
    assert_png(path)
    assert plot_head_importance(torch.rand(12, 12), str(tmp_path / "big.png")) is not None  # no annotations
    assert_png(tmp_path / "big.png")


@pytest.mark.parametrize("importance, removed, match", [
    (torch.empty(0, 4), None, "importance"),
    (torch.rand(4), None, "importance"),
    (torch.tensor([[1.0, float("nan")]]), None, "importance"),
    (torch.rand(2, 4), {2: [0]}, "removed"),
    (torch.rand(2, 4), {0: [4]}, "removed"),
])
def test_head_importance_refuses_bad_input(importance, removed, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        plot_head_importance(importance, str(tmp_path / "x.png"), removed=removed)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PruningTrainer run of 6 steps (eval every 3) with plot_dir set: (trainer, plot_dir)."""
    root = tmp_path_factory.mktemp("trained")
    trainer = PruningTrainer(
        model=tiny_bert(),
        args=training_args(root / "out", max_steps=6, eval_strategy="steps", eval_steps=3),
        pruning_config=PruningConfig(target_sparsity=0.6, pruning_interval=1, warmup_fraction=0.2,
                                     cooldown_fraction=0.2),
        train_dataset=random_classification_data(),
        eval_dataset=random_classification_data(n=16, seed=1),
        compute_metrics=compute_metrics,
        plot_dir=str(root / "plots"),
    )
    trainer.train()
    return trainer, root / "plots"


def test_pruning_trainer_plot_dir_writes_schedule_and_layer_sparsity(trained):
    needs_matplotlib()
    trainer, plot_dir = trained
    assert sorted(p.name for p in plot_dir.iterdir()) == ["layer_sparsity.png", "schedule.png"]
    assert_png(plot_dir / "schedule.png")
    assert_png(plot_dir / "layer_sparsity.png")


def test_schedule_from_a_real_log_history(trained, tmp_path):
    needs_matplotlib()
    history = trained[0].state.log_history
    assert any("eval_accuracy" in e for e in history) and any("scheduled_sparsity" in e for e in history)
    assert plot_schedule(history, str(tmp_path / "s.png")) == str(tmp_path / "s.png")
    assert plot_schedule(history, str(tmp_path / "f1.png"), metric="macro_f1") is not None  # eval_ prefix added
    assert_png(tmp_path / "s.png")
    assert_png(tmp_path / "f1.png")


def test_schedule_draws_structured_fractions_without_an_eval_metric(tmp_path):
    needs_matplotlib()
    history = [{"step": s, "loss": 1.0, "sparsity": 0.0, "scheduled_sparsity": 0.0, "heads_pruned": s / 20,
                "neurons_pruned": s / 10} for s in range(1, 6)]
    assert_png(plot_schedule(history, str(tmp_path / "s.png")))


@pytest.mark.parametrize("history", [[], [{"loss": 1.0, "step": 1}, {"eval_accuracy": 0.5, "step": 1}]])
def test_schedule_refuses_a_log_without_sparsity(history, tmp_path):
    with pytest.raises(ValueError, match="log_history"):
        plot_schedule(history, str(tmp_path / "x.png"))


def test_plot_training_skips_what_it_cannot_draw_and_warns(tmp_path, caplog):
    needs_matplotlib()
    with caplog.at_level(logging.WARNING):
        written = plot_training([{"loss": 1.0, "step": 1}], pruned_bert(0.5), str(tmp_path))
    assert list(written) == ["layer_sparsity"] and (tmp_path / "layer_sparsity.png").is_file()
    assert not (tmp_path / "schedule.png").exists() and "no schedule.png" in caplog.text


def test_pruning_trainer_without_matplotlib_warns_and_trains(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(canvas, "is_matplotlib_available", lambda: False)
    trainer = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path / "out", max_steps=3),
                             pruning_config=PruningConfig(target_sparsity=0.5, pruning_interval=1),
                             train_dataset=random_classification_data(n=24), plot_dir=str(tmp_path / "plots"))
    with caplog.at_level(logging.WARNING):
        result = trainer.train()
    assert result.global_step == 3 and trainer.pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)
    assert not (tmp_path / "plots").exists()
    assert caplog.text.count("matplotlib is not installed") == 1


# ------------------------------------------------------------------------------------------------ results
def test_accuracy_vs_sparsity_and_latency_write_pngs(tmp_path):
    needs_matplotlib()
    assert_png(plot_accuracy_vs_sparsity(accuracy_rows(), str(tmp_path / "curve.png")))
    unlabelled = [{"sparsity": 0.5, "accuracy": 0.7}, {"sparsity": 0.0, "accuracy": 0.8}]
    assert_png(plot_accuracy_vs_sparsity(unlabelled, str(tmp_path / "one.png")))
    assert_png(plot_accuracy_latency(benchmark_results(), str(tmp_path / "latency.png")))


@pytest.mark.parametrize("rows, match", [
    ([], "rows is empty"),
    ([{"sparsity": 0.5, "accuracy": 0.7}, {"sparsity": 0.9}], r"rows\[1\]\['accuracy'\]"),
    ([{"sparsity": 90, "accuracy": 0.7}], r"rows\[0\].*fractions"),
    ([{"sparsity": "0.5", "accuracy": 0.7}], r"rows\[0\]\['sparsity'\]"),
    (["0.5"], r"rows\[0\]"),
])
def test_accuracy_vs_sparsity_refuses_bad_rows(rows, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        plot_accuracy_vs_sparsity(rows, str(tmp_path / "x.png"))


def test_lm_candidates_write_pngs_with_and_without_speedups_and_perplexities(tmp_path):
    needs_matplotlib()
    assert_png(plot_lm_candidates(lm_report(), str(tmp_path / "full.png")))
    assert_png(plot_lm_candidates(lm_report(speedups=False), str(tmp_path / "no_speedups.png")))
    assert_png(plot_lm_candidates(lm_report(perplexities=False), str(tmp_path / "no_perplexities.png")))
    bare = {"candidates": [{"axes": "experts", "params_ratio": 0.8, "decode_speedup": None, "chosen": True}]}
    assert_png(plot_lm_candidates(bare, str(tmp_path / "plots" / "bare.png")), min_kb=4)  # no models, no target


@pytest.mark.parametrize("bad, match", [
    ({}, "candidates"),
    ({"candidates": [], "models": {}}, "no candidates"),
    ({"candidates": ["0.5"]}, r"\['candidates'\]\[0\]"),
    ({"candidates": [{"axes": "hidden", "params_ratio": None}]}, r"\['candidates'\]\[0\]\['params_ratio'\]"),
    ({"candidates": [{"params_ratio": 0.5, "perplexity_after_cut": float("nan")}]}, "perplexity_after_cut"),
    ({"candidates": [], "models": {"optimized": {"params_ratio": 0.7, "decode_speedup": "fast"}}},
     r"\['models'\]\['optimized'\]\['decode_speedup'\]"),
    ({"candidates": [{"params_ratio": 0.5}], "target": {"params": "0.6"}}, r"\['target'\]\['params'\]"),
])
def test_lm_candidates_refuse_bad_reports(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        plot_lm_candidates(bad, str(tmp_path / "x.png"))


def test_sensitivity_grid_orders_groups_by_layer_then_kind():
    groups, levels, grid = sensitivity_grid(sensitivity_result())
    assert groups == ["layer 0 heads", "layer 0 neurons", "layer 1 heads", "layer 1 neurons", "embeddings"]
    assert levels == [0.25, 0.5, 0.75]
    assert grid[1] == pytest.approx([-0.075, -0.15, -0.225])
    assert grid[4][1] == pytest.approx(-0.3) and all(v != v for v in (grid[4][0], grid[4][2]))  # NaN: not measured


def test_sensitivity_writes_a_png_for_either_direction_of_the_metric(tmp_path):
    needs_matplotlib()
    assert_png(plot_sensitivity(sensitivity_result(), str(tmp_path / "accuracy.png")))
    loss = {**sensitivity_result(), "metric": "loss", "higher_is_better": False}  # positive deltas are the bad ones
    for row in loss["rows"]:
        row["group"] = f"bert.encoder.layer.{row['layer']}:{row['kind']}" if row["layer"] is not None else "embeddings"
    assert_png(plot_sensitivity(loss, str(tmp_path / "loss.png")))


def test_group_names_lose_their_shared_module_path_and_deltas_keep_three_digits():
    assert short_names(["bert.encoder.layer.0:heads", "bert.encoder.layer.0.attention.self.key"]) == (
        "bert.encoder.", ["layer.0:heads", "layer.0.attention.self.key"])
    assert short_names(["model.layers.0.mlp", "embeddings"]) == ("", ["model.layers.0.mlp", "embeddings"])
    assert short_names(["bert.encoder.layer.0"]) == ("", ["bert.encoder.layer.0"])
    assert [signed_format(0.868)(v) for v in (0.868, -0.0061)] == ["+0.868", "-0.006"]
    assert signed_format(0.02)(-0.0123) == "-0.0123" and signed_format(250.0)(-12.4) == "-12"


@pytest.mark.parametrize("bad, match", [
    ({}, "sensitivity"),
    ({"baseline": 0.8, "rows": []}, "sensitivity"),
    ({"rows": [{"level": 0.5, "delta": -0.1}]}, r"\['rows'\]\[0\].*group"),
    ({"rows": [{"group": "g", "level": 0.5}]}, r"\['rows'\]\[0\]\['delta'\]"),
    ({"rows": [{"group": "g", "level": None, "delta": 0.1}]}, r"\['rows'\]\[0\]\['level'\]"),
])
def test_sensitivity_refuses_bad_input(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        plot_sensitivity(bad, str(tmp_path / "x.png"))


# ------------------------------------------------------------------------------------------------ no matplotlib
@pytest.mark.parametrize("draw", [
    lambda p: plot_layer_sparsity(pruned_bert(0.5), p),
    lambda p: plot_sparsity_heatmap(pruned_bert(0.5), p),
    lambda p: plot_head_importance(torch.rand(2, 4), p, removed={0: [1]}),
    lambda p: plot_schedule([{"step": 1, "sparsity": 0.1, "scheduled_sparsity": 0.1}], p),
    lambda p: plot_accuracy_vs_sparsity(accuracy_rows(), p),
    lambda p: plot_accuracy_latency(benchmark_results(), p),
    lambda p: plot_sensitivity(sensitivity_result(), p),
    lambda p: plot_lm_candidates(lm_report(), p),
], ids=["layer_sparsity", "heatmap", "heads", "schedule", "accuracy_sparsity", "accuracy_latency", "sensitivity",
        "lm_candidates"])
def test_without_matplotlib_every_picture_warns_once_and_returns_none(draw, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(canvas, "is_matplotlib_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert draw(str(tmp_path / "x.png")) is None
    assert caplog.text.count("matplotlib is not installed") == 1
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ hf-prune train
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny pretrained BERT encoder and its WordPiece tokenizer in one folder (as tests/test_job.py builds it)."""
    root = tmp_path_factory.mktemp("tiny_model")
    tokenizer = tiny_tokenizer(root)
    tiny_bert(vocab_size=tokenizer.vocab_size).bert.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


@pytest.fixture
def job_logger_restored():
    """`hf-prune train` attaches a stderr handler to the `hf_prune.commands.job` logger once per process, bound to the stderr
    of that moment: put the logger back so a later test capturing stderr gets its own handler."""
    job_logger = logging.getLogger("hf_prune.commands.job")
    handlers, level = list(job_logger.handlers), job_logger.level
    yield
    job_logger.handlers[:] = handlers
    job_logger.setLevel(level)


def labelled(n, labels, seed=0):
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(4)), labels[i % len(labels)]) for i in range(n)]


def test_hf_prune_train_writes_pngs_next_to_results_json(model_dir, tmp_path, job_logger_restored):
    needs_matplotlib()
    train = write_csv(tmp_path / "train.csv", labelled(40, ["positive", "negative"]))
    valid = write_csv(tmp_path / "valid.csv", labelled(8, ["negative", "positive"], seed=1))
    test = write_csv(tmp_path / "test.csv", labelled(10, ["negative", "positive"], seed=2))
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", model_dir, "--output_dir", str(out), "--max_steps", "4",
                 "--per_device_train_batch_size", "8", "--max_length", "16", "--logging_steps", "1", "--use_cpu",
                 "--disable_tqdm", "true", "--pruning_interval", "1", "--train_file", train, "--validation_file",
                 valid, "--test_file", test, "--eval_strategy", "steps", "--eval_steps", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["arms"]["pruned"]["sparsity"] > 0.5
    assert_png(out / "schedule.png")
    assert_png(out / "layer_sparsity.png")
