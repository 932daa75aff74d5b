"""`hf-prune optimize` (hf_prune.commands.optimize): a tiny fine-tuned BERT classifier and small CSV files, the whole pipeline
for real (importance, candidate shapes exported and timed in ONNX Runtime, distilled recovery with the real
Trainer, save_pruned/load_pruned, Optimum export, create_session, benchmark, report); bad options refused first."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from hf_prune.cli import main
from hf_prune.commands.optimize import parse_args as parse_optimize_args
from hf_prune.export import is_onnx_available
from hf_prune.commands.optimize import OptimizeArguments, validate_optimize

from conftest import WORDS, tiny_bert, tiny_tokenizer, write_csv

def needs_onnx(test):
    """Marked `onnx` (deselected on the leg without the extra) and skipped where it is not installed."""
    return pytest.mark.onnx(pytest.mark.skipif(not is_onnx_available(), reason="needs the onnx extra")(test))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize_data")
    rng = random.Random(0)
    paths = {}
    for split, n in (("train", 48), ("validation", 18), ("test", 24)):
        rows = [(" ".join(rng.choice(WORDS) for _ in range(5)), ("bad", "good", "meh")[i % 3]) for i in range(n)]
        paths[split] = str(write_csv(root / f"{split}.csv", rows))
    return paths


def optimize_argv(model_dir, data, out, *extra):
    """Arguments for a run of seconds: 3 recovery steps of 8 examples, 16 tokens, coarse grid, few timings."""
    return ["--model_name_or_path", model_dir, "--train_file", data["train"], "--validation_file",
            data["validation"], "--test_file", data["test"], "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--max_length", "16", "--use_cpu", "--disable_tqdm", "true",
            "--logging_steps", "1", "--fraction_step", "0.25", "--max_fraction", "0.75", "--calibration_batches", "2",
            "--timing_rounds", "1", "--timing_repeats", "2", "--benchmark_rounds", "1", "--benchmark_repeats", "2",
            *extra]


# ------------------------------------------------------------------------------------------------ bad input first
@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give a target"),
        (["--target_speedup", "0.9"], "--target_speedup 0.9"),
        (["--max_accuracy_drop", "-1"], "--max_accuracy_drop -1"),
        (["--target_speedup", "2", "--speedup_precision", "int8"], "--speedup_precision int8 needs --quantize"),
        (["--target_speedup", "2", "--max_fraction", "1.0"], "--max_fraction 1.0"),
        (["--target_speedup", "2", "--head_sparsity", "0.5"], "optimize chooses the fractions itself"),
        (["--target_speedup", "2", "--importance", "nonsense"], "--importance 'nonsense'"),
        (["--target_speedup", "2", "--hidden_fraction", "1.0"], "--hidden_fraction 1.0 is invalid"),
        (["--target_speedup", "2", "--layers_to_remove", "-1"], "--layers_to_remove -1 is invalid"),
        (["--target_speedup", "2", "--search_axes", "true"], "--search_axes True / --search_steps 0 apply to causal"),
        (["--target_speedup", "2", "--layer_importance", "x"], "--layer_importance 'x' is not a registered"),
    ],
)
def test_bad_options_fail_before_any_model_is_loaded(classifier_dir, data_files, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["optimize", *optimize_argv(classifier_dir, data_files, tmp_path / "out", *extra)])
    assert message in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_optimize_without_the_onnx_extra_says_how_to_install_it(classifier_dir, data_files, tmp_path):
    if is_onnx_available():
        pytest.skip("the onnx extra is installed")
    with pytest.raises(SystemExit, match="onnx"):
        main(["optimize", *optimize_argv(classifier_dir, data_files, tmp_path / "out", "--target_speedup", "2")])


@needs_onnx
def test_accuracy_budget_needs_a_validation_split(classifier_dir, data_files, tmp_path):
    argv = [a for a in optimize_argv(classifier_dir, data_files, tmp_path / "out", "--max_accuracy_drop", "1")]
    i = argv.index("--validation_file")
    del argv[i:i + 2]
    with pytest.raises(SystemExit, match="--max_accuracy_drop 1.0 is checked on a validation split"):
        main(["optimize", *argv])


@needs_onnx
def test_a_model_without_a_classifier_head_is_refused(data_files, tmp_path):
    root = tmp_path / "encoder"
    tokenizer = tiny_tokenizer(root)
    tiny_bert(vocab_size=tokenizer.vocab_size).bert.save_pretrained(root)
    tokenizer.save_pretrained(root)
    with pytest.raises(SystemExit, match="not a sequence classifier"):
        main(["optimize", *optimize_argv(str(root), data_files, tmp_path / "out", "--target_speedup", "2")])


def test_optimize_defaults_are_the_recovery_recipe():
    args = parse_optimize_args(["--model_name_or_path", "m", "--target_speedup", "2.8"])
    assert args.training.max_steps == 500 and args.training.learning_rate == 3e-4
    assert args.pruning.target_sparsity == 0.0 and args.pruning.distillation_alpha == 0.9
    assert args.training.output_dir == "outputs/optimize"
    assert args.optimize.target_speedup == 2.8 and args.optimize.recovery_seeds is None


def test_validate_optimize_without_data():
    from hf_prune import PruningConfig

    with pytest.raises(ValueError, match="--model_name_or_path is not set"):
        validate_optimize(OptimizeArguments(target_speedup=2.0), PruningConfig(target_sparsity=0.0))


# ------------------------------------------------------------------------------------------------ the pipeline
@needs_onnx
def test_unreachable_speedup_reports_the_closest_point(classifier_dir, data_files, tmp_path, capsys):
    from hf_prune import create_session, load_pruned

    out = tmp_path / "out"
    code = main(["optimize", *optimize_argv(classifier_dir, data_files, out, "--target_speedup", "1000",
                                            "--quantize", "dynamic", "--recovery_seeds", "3", "4")])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    # Nothing reaches 1000x: the largest fraction allowed is the closest point, and the report says so.
    assert report["target"]["met"] is False and report["target"]["speedup_met"] is False
    assert report["chosen"]["fraction_removed"] == 0.75
    assert [c["fraction"] for c in report["candidates"]] == [0.75]  # the largest first; it fell short: no bisection
    assert "NOT MET" in (out / "report.md").read_text()
    assert "NOT MET" in capsys.readouterr().out
    # Two recovery seeds of the chosen shape, both reported; the kept one is the better on validation.
    recoveries = report["recoveries"]
    assert [r["seed"] for r in recoveries] == [3, 4]
    best = max(recoveries, key=lambda r: r["validation"]["accuracy"])
    assert report["chosen"]["seed"] == best["seed"]
    assert report["seeds"]["seeds"] == [3, 4] and "test_accuracy_std" in report["seeds"]
    # 75% of 4 heads in each of 2 layers = 6 heads gone, ranked across layers.
    assert sum(report["chosen"]["heads_per_layer"]) == 2
    model = load_pruned(str(out / "model"))
    assert sum(model.config.hf_prune_structure["heads_per_layer"]) == 2
    assert model.config.id2label == {0: "bad", 1: "good", 2: "meh"}
    card = (out / "model" / "README.md").read_text()
    assert "## Test results" in card and "this model" in card
    session = create_session(str(out / "onnx"))
    assert session.hf_prune_session["variant"] == "int8"
    rows = {(r["name"], r["precision"]) for r in report["benchmark"]}
    assert rows == {("dense", "fp32"), ("dense", "int8"), ("optimized", "fp32"), ("optimized", "int8")}
    assert (out / "report.png").is_file() or "matplotlib" not in report
    assert report["wall_seconds"] > 0


@needs_onnx
def test_accuracy_budget_bisects_with_recoveries(classifier_dir, data_files, tmp_path):
    from hf_prune import load_pruned

    out = tmp_path / "out"
    # A budget of 100 points holds for every fraction: the bisection climbs to the largest (0.25 -> 0.5 -> 0.75).
    assert main(["optimize", *optimize_argv(classifier_dir, data_files, out, "--max_accuracy_drop", "100")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["met"] is True and report["target"]["accuracy_met"] is True
    assert report["chosen"]["fraction_removed"] == 0.75
    assert [c["fraction"] for c in report["candidates"]] == [0.5, 0.75]
    assert [r["fraction"] for r in report["recoveries"]] == [0.5, 0.75]  # one recovery per probe, none repeated
    model = load_pruned(str(out / "model"))
    dense_heads = 2 * 4
    assert sum(model.config.hf_prune_structure["heads_per_layer"]) == dense_heads - 6


@needs_onnx
def test_a_failed_run_keeps_the_previous_model(classifier_dir, data_files, tmp_path, monkeypatch):
    import hf_prune.commands.optimize as optimize

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "keep.txt").write_text("previous good model")

    def broken_export(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(optimize.PruningTrainer, "save_model", lambda self, path=None, **kw: broken_export())
    with pytest.raises(RuntimeError, match="disk full"):
        main(["optimize", *optimize_argv(classifier_dir, data_files, out, "--target_speedup", "1000")])
    assert (out / "model" / "keep.txt").read_text() == "previous good model"
    assert not [p for p in out.iterdir() if p.name.startswith(".model.staging")]


@needs_onnx
def test_width_and_depth_apply_to_every_candidate(classifier_dir, data_files, tmp_path):
    from hf_prune import create_session, load_pruned, structure_summary

    out = tmp_path / "out"
    # Hidden-state distillation too: the student's layers and channels are matched to the dense teacher's.
    assert main(["optimize", *optimize_argv(classifier_dir, data_files, out, "--target_speedup", "1000",
                                            "--layers_to_remove", "1", "--hidden_fraction", "0.25",
                                            "--distillation_hidden_weight", "1.0")]) == 0
    report = json.loads((out / "report.json").read_text())
    chosen = report["chosen"]
    assert chosen["num_layers"] == 1 and len(chosen["layers_removed"]) == 1
    assert chosen["hidden_size"] == 24 and chosen["original_hidden_size"] == 32  # 32 x 0.75, a multiple of 8
    assert len(chosen["heads_per_layer"]) == 1
    assert "hidden size 32 -> 24" in (out / "report.md").read_text()
    model = load_pruned(str(out / "model"))
    summary = structure_summary(model)
    assert summary["hidden_size"] == 24 and summary["num_layers"] == 1
    assert summary["pruned_layers"] == chosen["layers_removed"]
    from transformers import AutoTokenizer

    session = create_session(str(out / "onnx"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    assert session(**tokenizer(["good bad meh"], return_tensors="pt")).logits.shape == (1, 3)


@needs_onnx
def test_removing_every_layer_is_refused_before_any_training(classifier_dir, data_files, tmp_path):
    with pytest.raises(SystemExit, match="--layers_to_remove 2 is invalid: .* has 2 layers and at least one must stay"):
        main(["optimize", *optimize_argv(classifier_dir, data_files, tmp_path / "out", "--target_speedup", "2",
                                         "--layers_to_remove", "2")])
    assert not (tmp_path / "out" / "model").exists()


def test_search_least_fraction_bisects_to_the_least_that_meets():
    from hf_prune.latency import LatencyPoint, fraction_grid, search_least_fraction

    grid = fraction_grid(0.1, 0.9)
    assert grid == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

    def measure(fraction):
        return LatencyPoint(fraction, [], [], 0, 1, 1.0, speedup={32: 1 / (1 - fraction)})

    chosen, tried, met = search_least_fraction(measure, grid, goal=2.5, batch_size=32, progress=False)
    assert met and chosen.fraction == 0.6  # 1/(1-0.6) = 2.5; 0.5 gives 2.0
    assert len(tried) <= 5 and tried[0].fraction == 0.9
    chosen, tried, met = search_least_fraction(measure, grid, goal=50, batch_size=32, progress=False)
    assert not met and chosen.fraction == 0.9 and len(tried) == 1
    assert fraction_grid(0.25, 0.6) == [0.25, 0.5, 0.6]
    assert fraction_grid(0.25, 0.9) == [0.25, 0.5, 0.75, 0.9]  # never past max_fraction (it once gave 1.0)
    assert fraction_grid(0.05, 0.9)[-1] == 0.9 and len(fraction_grid(0.05, 0.9)) == 18
    with pytest.raises(ValueError, match="max_fraction"):
        fraction_grid(0.5, 1.0)


@needs_onnx
def test_latency_probe_times_a_smaller_shape_against_dense():
    from hf_prune import prune_ffn_neurons, prune_heads
    from hf_prune.latency import LatencyProbe

    dense = tiny_bert(num_labels=2).eval()
    small = tiny_bert(num_labels=2).eval()
    prune_heads(small, {0: [0, 1, 2], 1: [1, 2, 3]})
    prune_ffn_neurons(small, {0: list(range(30)), 1: list(range(30))})
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with LatencyProbe(dense, seq_len=16, batch_sizes=[1, 4], rounds=1, repeats=2) as probe:
        point = probe.measure(small, 0.75)
        workdir = probe.workdir
    assert not workdir.exists()  # temporary ONNX files are gone
    assert point.heads_per_layer == [1, 1] and point.intermediate_sizes == [34, 34]
    assert point.flop_ratio_limit > 2
    assert set(point.speedup) == {1, 4} and all(v > 0 for v in point.speedup.values())
    assert point.parameters == sum(p.numel() for p in small.parameters())
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())  # exported a copy


@needs_onnx
@pytest.mark.parametrize("family", ["deberta-v2", "modernbert"])
def test_optimize_reaches_other_encoder_families(family, data_files, tmp_path):
    """The same command on a DeBERTa-v2 and a ModernBERT classifier: scored, cut, recovered, exported, reloaded."""
    from hf_prune import load_pruned

    root = tmp_path / "model"
    tokenizer = tiny_tokenizer(root)
    config_class = {"deberta-v2": transformers.DebertaV2Config, "modernbert": transformers.ModernBertConfig}[family]
    config = config_class(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0,
                          id2label={0: "bad", 1: "good", 2: "meh"}, label2id={"bad": 0, "good": 1, "meh": 2})
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    out = tmp_path / "out"
    assert main(["optimize", *optimize_argv(str(root), data_files, out, "--target_speedup", "1000")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"]["fraction_removed"] == 0.75
    assert sum(report["chosen"]["heads_per_layer"]) == 2
    model = load_pruned(str(out / "model"))
    assert type(model).__name__ == config_class.__name__.replace("Config", "ForSequenceClassification")


# ------------------------------------------------------------------------------------------------ finished phases
@needs_onnx
def test_a_rerun_continues_from_the_finished_phases_and_refuses_those_of_other_options(classifier_dir, data_files,
                                                                                        tmp_path, caplog):
    import shutil

    from hf_prune import load_pruned

    out = tmp_path / "out"
    argv = optimize_argv(classifier_dir, data_files, out, "--target_speedup", "1000", "--recovery_seeds", "3", "4",
                         "--save_strategy", "steps", "--save_steps", "2")
    argv[argv.index("--max_steps") + 1] = "4"
    assert main(["optimize", *argv]) == 0
    whole = {name: t.clone() for name, t in load_pruned(str(out / "model")).state_dict().items()}
    seed4 = load_pruned(str(out / "recovery" / "0.75-seed4" / "model")).state_dict()
    assert sorted(p.name for p in (out / "phases").iterdir()) == [
        "dense.pt", "export.pt", "importance.pt", "recovery-0.75-seed3-started.pt", "recovery-0.75-seed3.pt",
        "recovery-0.75-seed4-started.pt", "recovery-0.75-seed4.pt", "search.pt"]
    first = json.loads((out / "report.json").read_text())
    assert first["phases_reused"] == []

    # The same command again: every phase reused, nothing trained, the same report.
    assert main(["optimize", *argv]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["phases_reused"] == ["dense", "importance", "search", "recovery-0.75-seed3",
                                       "recovery-0.75-seed4", "export"]
    assert [r["reused"] for r in report["recoveries"]] == [True, True]
    assert report["chosen"] == first["chosen"] and report["dense"] == first["dense"]
    assert [c["ms"] for c in report["candidates"]] == [c["ms"] for c in first["candidates"]]  # the kept timings

    # Killed in seed 4's recovery after checkpoint-2: its model, its phase, the later checkpoint and the export never
    # written. The rerun keeps seed 3, continues seed 4 from checkpoint-2 and ends with the same weights.
    shutil.rmtree(out / "recovery" / "0.75-seed4" / "model")
    shutil.rmtree(out / "recovery" / "0.75-seed4" / "checkpoint-4")
    for name in ("recovery-0.75-seed4.pt", "export.pt"):
        (out / "phases" / name).unlink()
    with caplog.at_level("INFO", logger="hf_prune.commands.optimize"):
        assert main(["optimize", *argv]) == 0
    assert "continuing from" in caplog.text and "checkpoint-2" in caplog.text
    report = json.loads((out / "report.json").read_text())
    assert report["phases_reused"] == ["dense", "importance", "search", "recovery-0.75-seed3"]
    for name, tensor in load_pruned(str(out / "recovery" / "0.75-seed4" / "model")).state_dict().items():
        torch.testing.assert_close(tensor, seed4[name], msg=name)
    for name, tensor in load_pruned(str(out / "model")).state_dict().items():
        torch.testing.assert_close(tensor, whole[name], msg=name)

    # Other options or other data: the phase they change is refused, naming the difference.
    other_steps = [a if a != "4" else "5" for a in argv]
    with pytest.raises(SystemExit, match=r"recovery-0.75-seed3.pt holds the recovery-0.75-seed3 phase of another run "
                                         r"\(training.max_steps: 4 then, 5 now\)"):
        main(["optimize", *other_steps])
    other_data = [data_files["validation"] if a == data_files["train"] else a for a in argv]
    with pytest.raises(SystemExit, match=r"dense.pt holds the dense phase of another run \(data.train: 'data:"):
        main(["optimize", *other_data])
    assert main(["optimize", *other_steps, "--resume_phases", "false"]) == 0
    assert json.loads((out / "report.json").read_text())["phases_reused"] == []
