"""Target discovery, pattern units (unstructured, block, N:M), exact top-k selection and the sparsity report."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import tiny_bert, tiny_gpt2

from hf_prune.config import PruningConfig
from hf_prune.masks import (
    check_pattern_fits,
    expand_units,
    find_target_modules,
    select_lowest,
    sparsity_report,
    unit_scores,
)
from hf_prune.pruner import Pruner

BERT_BLOCK_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
GPT2_BLOCK_CONV1DS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ------------------------------------------------------------------------------------------- find_target_modules
def test_default_targets_bert():
    found = find_target_modules(tiny_bert())
    expected = [f"bert.encoder.layer.{i}.{suffix}" for i in range(2) for suffix in BERT_BLOCK_LINEARS]
    assert list(found) == expected
    assert all(isinstance(module, nn.Linear) for module in found.values())
    assert not any("pooler" in name or "classifier" in name or "embeddings" in name for name in found)


def test_default_targets_gpt2_conv1d():
    model = tiny_gpt2()
    found = find_target_modules(model)
    expected = [f"transformer.h.{i}.{suffix}" for i in range(2) for suffix in GPT2_BLOCK_CONV1DS]
    assert list(found) == expected
    assert all(type(module).__name__ == "Conv1D" for module in found.values())
    assert "lm_head" not in found and isinstance(model.lm_head, nn.Linear)


def test_targets_and_exclude():
    model = tiny_bert()
    found = find_target_modules(model, targets=[r"attention"], exclude=[r"\.key$", r"output"])
    assert list(found) == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]


# ----------------------------------------------------------------------------------------------- unstructured
def test_unstructured_exact_count_and_lowest():
    torch.manual_seed(1)
    scores = torch.rand(8, 16)
    config = PruningConfig(granularity="unstructured")
    units = unit_scores(scores, config)
    assert units.shape == (128,)
    (pruned,) = select_lowest([units], 0.37)
    mask = expand_units(pruned, scores.shape, config)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == round(0.37 * 128)
    assert scores[mask].max() < scores[~mask].min()


def test_select_lowest_global_across_tensors():
    torch.manual_seed(2)
    units = [torch.rand(100), torch.rand(30) + 0.5, torch.rand(70) * 0.5]
    pruned = select_lowest(units, 0.4)
    assert [p.shape for p in pruned] == [u.shape for u in units]
    assert sum(int(p.sum()) for p in pruned) == 80
    pruned_scores = torch.cat([u[p] for u, p in zip(units, pruned)])
    kept_scores = torch.cat([u[~p] for u, p in zip(units, pruned)])
    assert pruned_scores.max() < kept_scores.min()


def test_select_lowest_ties_do_not_overshoot():
    # Half the scores are zero (already pruned weights): asking for 30% must prune exactly 30%, not 50%.
    scores = torch.cat([torch.zeros(50), torch.rand(50) + 1])
    (pruned,) = select_lowest([scores], 0.3)
    assert int(pruned.sum()) == 30
    (pruned,) = select_lowest([scores], 0.0)
    assert int(pruned.sum()) == 0


# -------------------------------------------------------------------------------------------------------- block
def test_block_units_are_block_sums():
    torch.manual_seed(3)
    scores = torch.rand(8, 12)
    config = PruningConfig(granularity="block", block_shape="2x3")
    units = unit_scores(scores, config)
    expected = torch.tensor(
        [[scores[r : r + 2, c : c + 3].sum() for c in range(0, 12, 3)] for r in range(0, 8, 2)]
    ).reshape(-1)
    torch.testing.assert_close(units, expected)


def test_block_pattern_gives_whole_zero_blocks():
    torch.manual_seed(4)
    scores = torch.rand(8, 12)
    config = PruningConfig(granularity="block", block_shape="2x3")
    (pruned,) = select_lowest([unit_scores(scores, config)], 0.5)
    mask = expand_units(pruned, scores.shape, config)
    assert mask.shape == (8, 12)
    assert int(mask.sum()) == 48
    blocks = mask.reshape(4, 2, 4, 3).permute(0, 2, 1, 3).reshape(16, 6)
    assert bool((blocks.all(dim=1) | ~blocks.any(dim=1)).all()), "every 2x3 block must be fully pruned or fully kept"
    assert int(blocks.all(dim=1).sum()) == 8


def test_block_pattern_on_bert_weights():
    model = tiny_bert()
    pruner = Pruner(model, PruningConfig(granularity="block", block_shape="4x8", target_sparsity=0.5))
    pruner.prune_to(0.5)
    for name, module in pruner.modules.items():
        out_f, in_f = module.weight.shape
        zero = (module.weight == 0).reshape(out_f // 4, 4, in_f // 8, 8).permute(0, 2, 1, 3).reshape(-1, 32)
        assert bool((zero.all(dim=1) | ~zero.any(dim=1)).all()), name
    assert pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------- N:M
def test_n_m_units_final_pattern():
    torch.manual_seed(5)
    scores = torch.rand(6, 16)
    config = PruningConfig(granularity="n:m", n_m="2:4", target_sparsity=0.5)
    (pruned,) = select_lowest([unit_scores(scores, config)], 0.5)
    mask = expand_units(pruned, scores.shape, config).reshape(6, 4, 4)
    assert bool((mask.sum(dim=-1) == 2).all())
    groups = scores.reshape(6, 4, 4)
    # In every group the two pruned weights are the two lowest-scoring.
    highest_pruned = groups.masked_fill(~mask, float("-inf")).amax(-1)
    lowest_kept = groups.masked_fill(mask, float("inf")).amin(-1)
    assert bool((highest_pruned < lowest_kept).all())


def _nonzeros_per_group_linear(weight: torch.Tensor, m: int) -> torch.Tensor:
    out_f, in_f = weight.shape
    return (weight != 0).reshape(out_f, in_f // m, m).sum(dim=-1)


def _nonzeros_per_group_conv1d(weight: torch.Tensor, m: int) -> torch.Tensor:
    # Conv1D stores (in_features, out_features): consecutive input weights run along dim 0.
    in_f, out_f = weight.shape
    return (weight != 0).reshape(in_f // m, m, out_f).sum(dim=1)


@pytest.mark.parametrize("n_m, n, m", [("2:4", 2, 4), ("1:4", 1, 4)])
def test_n_m_final_sparsity_linear(n_m, n, m):
    model = tiny_bert()
    config = PruningConfig(granularity="n:m", n_m=n_m, target_sparsity=1 - n / m)
    pruner = Pruner(model, config)
    pruner.prune_to(config.target_sparsity)
    for name, module in pruner.modules.items():
        counts = _nonzeros_per_group_linear(module.weight.detach(), m)
        assert bool((counts == n).all()), name


def test_n_m_final_sparsity_gpt2_conv1d():
    model = tiny_gpt2()
    original = {n: m.weight.detach().clone() for n, m in find_target_modules(model).items()}
    config = PruningConfig(granularity="n:m", n_m="2:4", target_sparsity=0.5)
    pruner = Pruner(model, config)
    pruner.prune_to(0.5)
    for name, module in pruner.modules.items():
        weight = module.weight.detach()
        assert bool((_nonzeros_per_group_conv1d(weight, 4) == 2).all()), name
        # The two kept weights in each group are the two largest in magnitude (magnitude method).
        in_f, out_f = weight.shape
        magnitude = original[name].abs().reshape(in_f // 4, 4, out_f)
        kept = (weight != 0).reshape(in_f // 4, 4, out_f)
        highest_pruned = magnitude.masked_fill(kept, float("-inf")).amax(1)
        lowest_kept = magnitude.masked_fill(~kept, float("inf")).amin(1)
        assert bool((highest_pruned <= lowest_kept).all()), name


@pytest.mark.parametrize(
    "model_fn, counter", [(tiny_bert, _nonzeros_per_group_linear), (tiny_gpt2, _nonzeros_per_group_conv1d)]
)
def test_n_m_intermediate_sparsity_never_exceeds_pattern(model_fn, counter):
    model = model_fn()
    pruner = Pruner(model, PruningConfig(granularity="n:m", n_m="2:4", target_sparsity=0.5))
    pruner.prune_to(0.3)
    assert pruner.measured_sparsity() == pytest.approx(0.3, abs=1e-3)
    for name, module in pruner.modules.items():
        counts = counter(module.weight.detach(), 4)
        assert bool((counts >= 2).all()), f"{name}: a group has more than M-N zeros"


# ------------------------------------------------------------------------------------------ check_pattern_fits
def test_check_pattern_fits_block_linear():
    linear = nn.Linear(30, 16)  # (out, in) = (16, 30)
    check_pattern_fits("ok", linear, PruningConfig(granularity="block", block_shape="8x5"))
    with pytest.raises(ValueError) as info:
        check_pattern_fits("encoder.layer.0.odd", linear, PruningConfig(granularity="block", block_shape="4x4"))
    assert "block_shape='4x4'" in str(info.value)
    assert "encoder.layer.0.odd" in str(info.value)


def test_check_pattern_fits_n_m_linear():
    linear = nn.Linear(30, 16)
    config = PruningConfig(granularity="n:m", n_m="2:4", target_sparsity=0.5)
    with pytest.raises(ValueError) as info:
        check_pattern_fits("encoder.layer.0.odd", linear, config)
    assert "n_m='2:4'" in str(info.value)
    assert "encoder.layer.0.odd" in str(info.value)
    check_pattern_fits("ok", linear, PruningConfig(granularity="n:m", n_m="1:3", target_sparsity=2 / 3))


def test_check_pattern_fits_uses_conv1d_orientation():
    conv = Conv1D(nf=16, nx=12)  # weight (12, 16); as (out, in) it is (16, 12)
    assert conv.weight.shape == (12, 16)
    check_pattern_fits("c", conv, PruningConfig(granularity="block", block_shape="4x6"))
    with pytest.raises(ValueError, match="block_shape"):
        check_pattern_fits("c", conv, PruningConfig(granularity="block", block_shape="6x4"))
    check_pattern_fits("c", conv, PruningConfig(granularity="n:m", n_m="1:3", target_sparsity=2 / 3))
    with pytest.raises(ValueError, match="n_m"):
        check_pattern_fits("c", conv, PruningConfig(granularity="n:m", n_m="1:8", target_sparsity=7 / 8))


def test_pruner_fails_early_when_pattern_does_not_fit():
    with pytest.raises(ValueError, match="block_shape"):
        Pruner(tiny_bert(), PruningConfig(granularity="block", block_shape="5x5"))


# -------------------------------------------------------------------------------------------- sparsity_report
@torch.no_grad()
def test_sparsity_report_counts_known_zeros():
    model = tiny_bert()
    for param in model.parameters():
        param.copy_(torch.rand_like(param) + 0.5)  # no zeros anywhere
    prefix = "bert.encoder.layer"
    query = model.bert.encoder.layer[0].attention.self.query.weight  # 32 x 32
    query.view(-1)[:100] = 0
    ffn_out = model.bert.encoder.layer[1].output.dense.weight  # 32 x 64
    ffn_out[:5] = 0  # 5 rows of 64
    model.classifier.weight[0, :3] = 0  # outside the targets
    model.bert.encoder.layer[0].intermediate.dense.bias[:7] = 0  # a bias, not a targeted weight

    report = sparsity_report(model)
    modules = report["modules"]
    assert len(modules) == 12
    assert modules[f"{prefix}.0.attention.self.query"]["zeros"] == 100
    assert modules[f"{prefix}.0.attention.self.query"]["sparsity"] == pytest.approx(100 / 1024)
    assert modules[f"{prefix}.1.output.dense"]["zeros"] == 320
    assert modules[f"{prefix}.1.output.dense"]["shape"] == [32, 64]
    assert modules[f"{prefix}.0.intermediate.dense"]["zeros"] == 0
    targeted = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert report["targeted_params"] == targeted
    assert report["zero_params"] == 420
    assert report["global_sparsity"] == pytest.approx(420 / targeted)
    assert report["model_params"] == sum(p.numel() for p in model.parameters())
    assert report["model_zero_params"] == 420 + 3 + 7


def test_sparsity_report_conv1d_shape_and_custom_targets():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, :10] = 0  # (32, 128): 10 output columns of 32 inputs
    report = sparsity_report(model, targets=[r"mlp\.c_fc"])
    assert list(report["modules"]) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    entry = report["modules"]["transformer.h.0.mlp.c_fc"]
    assert entry["shape"] == [128, 32]
    assert entry["zeros"] == 320
    assert report["zero_params"] == 320


# ------------------------------------------------------------------------------- selection without a full sort
@pytest.mark.parametrize("case", ["random", "ties", "pruned_minus_inf", "sorted_adversarial", "plus_inf"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.999])
def test_sampled_selection_is_exact(monkeypatch, case, sparsity):
    from hf_prune import masks

    monkeypatch.setattr(masks, "DIRECT_SELECTION_LIMIT", 1000)  # force the sampling path on small tensors
    generator = torch.Generator().manual_seed(0)
    units = [torch.randn(n, generator=generator) for n in (3000, 517, 12000)]
    if case == "ties":
        units = [u.round() for u in units]  # a handful of distinct values, thousands of ties each
    elif case == "pruned_minus_inf":
        for u in units:
            u[: u.numel() * 8 // 10] = float("-inf")
    elif case == "sorted_adversarial":
        units = [torch.sort(u).values for u in units]
    elif case == "plus_inf":
        for u in units:
            u[1::2] = float("inf")  # what N:M gives the protected weights
    pruned = masks.select_lowest(units, sparsity)
    total = sum(u.numel() for u in units)
    assert sum(int(p.sum()) for p in pruned) == int(round(sparsity * total))
    flat, chosen = torch.cat(units), torch.cat(pruned)
    # Nothing kept scores below anything pruned.
    assert float(flat[chosen].max()) <= float(flat[~chosen].min())
