"""hf_prune.sensitivity: one group pruned at a time, the metric measured, the weights put back bit for bit; the
result's files; `hf-prune sensitivity` on a tiny saved classifier and small CSV files."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from torch import nn

from hf_prune import PruningConfig, Pruner, SensitivityResult, analyze_sensitivity, plan_sparsities
from hf_prune.cli import main
from hf_prune.commands.train import parse_args as parse_train_args
from hf_prune.commands.sensitivity import SensitivityArguments
from hf_prune.sensitivity import GROUP_KINDS, sensitivity_groups

from conftest import WORDS, build_model, make_batches, write_csv


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in [*model.named_parameters(), *model.named_buffers()]}


def assert_unchanged(model, before):
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert set(now) == set(before)
    for name, tensor in now.items():
        assert torch.equal(tensor.detach(), before[name]), name


class Toy(nn.Module):
    """Two residual Linear blocks named like transformer layers; block 0's output counts fully, block 1's is scaled
    by 0.01, so pruning block 0 hurts and pruning block 1 barely shows. The loss is the distance to the dense output."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(width, width)}) for _ in range(2)])
        self.scales = (1.0, 0.01)

    def forward(self, x, labels=None):
        h = x
        for layer, scale in zip(self.layers, self.scales):
            h = h + scale * layer["proj"](h)
        out = {"logits": h}
        if labels is not None:
            out["loss"] = ((h - labels) ** 2).mean()
        return out


def toy_batches(model, n=2):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        x = torch.randn(8, 16, generator=generator)
        with torch.no_grad():
            batches.append({"x": x, "labels": model(x)["logits"].clone()})
    return batches


# ------------------------------------------------------------------------------------------------ restore
@pytest.mark.parametrize("arch, method", [("bert", "magnitude"), ("bert", "movement"), ("gpt2", "magnitude"),
                                          ("llama", "magnitude")])
def test_every_weight_and_buffer_is_restored_bit_for_bit(arch, method):
    model = build_model(arch).train()
    before = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    result = analyze_sensitivity(model, make_batches(arch, n=2), method=method, levels=(0.5, 1.0), progress=False)
    assert result.rows
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())  # train mode given back


def test_weights_are_restored_when_the_metric_fails_midway():
    model = build_model("bert")
    before = snapshot(model)
    calls = []

    def flaky(model, batches):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("metric failed")
        return 0.0

    with pytest.raises(RuntimeError, match="metric failed"):
        analyze_sensitivity(model, make_batches("bert"), metric=flaky, groups=["linear"], progress=False)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ rows
def test_every_group_has_a_row_for_every_level():
    model = build_model("bert")
    levels = (0.3, 0.5, 0.7, 0.9)
    result = analyze_sensitivity(model, make_batches("bert"), levels=levels, progress=False)
    assert {row["kind"] for row in result.rows} == set(GROUP_KINDS)
    assert set(result.groups) == {row["group"] for row in result.rows}
    for group, info in result.groups.items():
        rows = [row for row in result.rows if row["group"] == group]
        assert sorted(row["level"] for row in rows) == list(levels)
        for row in rows:
            assert set(row) == {"group", "kind", "layer", "level", "metric", "delta", "params"}
            assert row["delta"] == pytest.approx(row["metric"] - result.baseline)
            assert row["params"] == info["params"] and row["kind"] == info["kind"]
            assert row["layer"] in (0, 1)
    weights = {n: info["params"] for n, info in result.groups.items() if info["kind"] == "linear"}
    assert result.groups["bert.encoder.layer.0"]["params"] == sum(
        v for n, v in weights.items() if n.startswith("bert.encoder.layer.0."))
    assert set(result.groups["bert.encoder.layer.1:attention"]["modules"]) == {
        f"bert.encoder.layer.1.attention.{p}" for p in ("self.query", "self.key", "self.value", "output.dense")}
    assert result.groups["bert.encoder.layer.0:heads"]["units"] == 4


def test_deltas_grow_with_the_level_where_pruning_hurts():
    model = build_model("bert")
    result = analyze_sensitivity(model, make_batches("bert"), groups=["linear"], levels=(0.9,), progress=False)
    assert any(row["delta"] != 0 for row in result.rows)
    toy = Toy()
    result = analyze_sensitivity(toy, toy_batches(toy), progress=False)
    deltas = [r["delta"] for r in result.rows if r["group"] == "layers.0.proj"]
    assert 0 < deltas[0] < deltas[1] < deltas[2] < deltas[3]
    assert deltas == [r["delta"] for r in result.rows if r["group"] == "layers.0"]  # a block of one Linear


def test_a_deliberately_sensitive_module_gets_less_sparsity():
    model = Toy()
    result = analyze_sensitivity(model, toy_batches(model), progress=False)
    assert set(result.groups) == {"layers.0.proj", "layers.1.proj", "layers.0", "layers.1"}  # no layout: no heads
    delta = {(r["group"], r["level"]): r["delta"] for r in result.rows}
    assert delta[("layers.0.proj", 0.5)] > 100 * delta[("layers.1.proj", 0.5)] > 0
    from hf_prune import allocate_sparsity

    plan = plan_sparsities(allocate_sparsity(result, 0.5))
    assert plan["layers.0.proj"] < 0.3 < 0.7 < plan["layers.1.proj"]
    assert (plan["layers.0.proj"] + plan["layers.1.proj"]) / 2 == pytest.approx(0.5, abs=1e-9)


def test_movement_accumulates_gradients_and_soft_movement_is_refused():
    model = Toy()
    batches = toy_batches(model)
    moved = analyze_sensitivity(model, batches, method="movement", groups=["linear"], progress=False)
    plain = analyze_sensitivity(model, batches, method="magnitude", groups=["linear"], progress=False)
    assert moved.method == "movement" and [r["metric"] for r in moved.rows] != [r["metric"] for r in plain.rows]
    with pytest.raises(ValueError, match="method='soft_movement'.*PruningTrainer.*'magnitude' or 'movement'"):
        analyze_sensitivity(model, batches, method="soft_movement", progress=False)


def test_max_batches_caps_what_is_read_and_the_same_batches_are_reused():
    model = build_model("bert")
    batches = make_batches("bert", n=5)
    read = []

    def loader():
        for batch in batches:
            read.append(1)
            yield batch

    seen = []

    def metric(model, given):
        seen.append(len(given))
        return 1.0

    metric.higher_is_better = True
    result = analyze_sensitivity(model, loader(), metric=metric, groups=["layer"], levels=(0.5,), max_batches=2,
                                 progress=False)
    assert len(read) == 2 and set(seen) == {2}
    assert result.metric == "metric" and result.higher_is_better and result.info["batches"] == 2


def test_accuracy_metric_and_language_models_without_labels():
    model = build_model("bert")
    result = analyze_sensitivity(model, make_batches("bert"), metric="accuracy", groups=["layer"], levels=(0.9,),
                                 progress=False)
    assert result.higher_is_better and 0.0 <= result.baseline <= 1.0
    lm = build_model("gpt2")
    result = analyze_sensitivity(lm, make_batches("gpt2", labels=False), groups=["layer"], levels=(0.9,),
                                 progress=False)
    assert result.metric == "loss" and not result.higher_is_better and result.baseline > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": ["layers"]}, "groups=\\['layers'\\] is invalid"),
    ({"levels": (0.5, 1.5)}, "levels=\\(0.5, 1.5\\) is invalid: give pruning levels in \\(0, 1\\]"),
    ({"levels": ()}, "levels=\\(\\) is invalid"),
    ({"max_batches": 0}, "max_batches=0 is invalid"),
    ({"metric": "f1"}, "metric='f1' is invalid"),
    ({"method": "nonsense"}, "method='nonsense' is not a registered pruning method"),
    ({"unit_importance": "nonsense"}, "unit_importance='nonsense'"),
])
def test_bad_arguments_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        analyze_sensitivity(build_model("bert"), make_batches("bert"), progress=False, **kwargs)


def test_structured_kinds_need_a_known_architecture():
    with pytest.raises(ValueError, match="groups=\\['heads'\\] needs an architecture"):
        sensitivity_groups(Toy(), ["heads"])


# ------------------------------------------------------------------------------------------------ files
def test_json_round_trip_and_csv(tmp_path):
    model = build_model("bert")
    result = analyze_sensitivity(model, make_batches("bert"), groups=["linear", "heads"], levels=(0.5,),
                                 progress=False)
    result.to_json(str(tmp_path / "s.json"))
    again = SensitivityResult.from_json(str(tmp_path / "s.json"))
    assert again == result
    result.to_csv(str(tmp_path / "s.csv"))
    with open(tmp_path / "s.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.rows)
    assert list(rows[0]) == ["group", "kind", "layer", "level", "metric", "delta", "params"]
    assert float(rows[0]["delta"]) == pytest.approx(result.rows[0]["delta"])
    assert result.most_sensitive(count=2)[0]["delta"] >= result.most_sensitive(count=2)[1]["delta"]


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity_data")
    rng = random.Random(0)
    paths = {}
    for split, n in (("train", 30), ("validation", 12)):
        rows = [(" ".join(rng.choice(WORDS) for _ in range(5)), ("bad", "good", "meh")[i % 3]) for i in range(n)]
        paths[split] = write_csv(root / f"{split}.csv", rows)
    return paths


def sensitivity_argv(model_dir, data, out, *extra):
    return ["sensitivity", "--model_name_or_path", model_dir, "--train_file", data["train"], "--output_dir", str(out),
            "--max_length", "16", "--batch_size", "4", "--max_batches", "2", "--levels", "0.5", "0.9",
            "--target_sparsity", "0.8", *extra]


def test_cli_writes_the_four_files_and_the_allocation_trains(classifier_dir, data_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(sensitivity_argv(classifier_dir, data_files, out, "--validation_file", data_files["validation"])) == 0
    assert {p.name for p in out.iterdir()} >= {"sensitivity.json", "sensitivity.csv", "allocation.json"}
    from hf_prune import plot

    if hasattr(plot, "plot_sensitivity") and plot.is_matplotlib_available():
        assert (out / "sensitivity.png").stat().st_size > 0
    saved = json.loads((out / "sensitivity.json").read_text())
    assert saved["info"]["split"] == "validation" and "validation.csv" in saved["info"]["split_source"]
    assert saved["metric"] == "accuracy" and saved["higher_is_better"] is True
    assert "validation split" in capsys.readouterr().out

    # As `hf-prune train --sparsity_overrides "$(cat allocation.json)"` and as a YAML config.
    text = (out / "allocation.json").read_text()
    by_flag = parse_train_args(["--model_name_or_path", classifier_dir, "--sparsity_overrides", text,
                                "--target_sparsity", "0.8"]).pruning
    config_file = tmp_path / "train.yaml"
    config_file.write_text(f"target_sparsity: 0.8\nsparsity_overrides: {text}", encoding="utf-8")
    by_yaml = parse_train_args(["--config", str(config_file)]).pruning
    assert by_flag.sparsity_overrides == by_yaml.sparsity_overrides == json.loads(text)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    pruner = Pruner(model, by_yaml)
    assert set(pruner.override_of) == set(pruner.modules) == set(plan_sparsities(by_yaml.sparsity_overrides))


def test_cli_without_validation_measures_on_train(classifier_dir, data_files, tmp_path, capsys):
    out = tmp_path / "out"
    main(sensitivity_argv(classifier_dir, data_files, out, "--groups", "linear", "--metric", "loss"))
    saved = json.loads((out / "sensitivity.json").read_text())
    assert saved["info"]["split"] == "train" and saved["metric"] == "loss"
    assert {row["kind"] for row in saved["rows"]} == {"linear"}
    assert "train split" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--groups", "heads"], "--groups \\['heads'\\] has no 'linear' groups"),
    (["--target_sparsity", "0.995"], "--target_sparsity=0.995 is invalid"),
    (["--method", "soft_movement"], "--method 'soft_movement' is invalid"),
    (["--levels", "0"], "--levels \\[0.0\\] is invalid"),
])
def test_cli_refuses_bad_options_before_loading_anything(classifier_dir, data_files, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(sensitivity_argv(classifier_dir, data_files, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_sensitivity_arguments_defaults():
    args = SensitivityArguments(model_name_or_path="m")
    assert args.levels == [0.3, 0.5, 0.7, 0.9] and args.metric == "accuracy" and args.split == "auto"
    assert PruningConfig(target_sparsity=args.target_sparsity)  # the default target is a valid one
