"""Pruning under DDP with two real processes (torchrun, gloo on CPU): every rank ends with the same masks and scores,
and the result equals a single-process run with the same global batch, within float tolerance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "distributed" / "train_worker.py"


def run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A clean launch, whatever this process inherited: earlier tests' TrainingArguments export ACCELERATE_* variables
    # (mixed precision, FSDP) that accelerate in the workers would obey.
    for key in list(env):
        if key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") or key.startswith(
                ("ACCELERATE_", "FSDP_")):
            del env[key]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_ddp_ranks_agree_and_match_one_process(tmp_path, method):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         str(ddp), method, "4"], tmp_path)
    run([sys.executable, str(WORKER), str(single), method, "8"], tmp_path)  # the same global batch of 8

    ranks = [torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reference = torch.load(single / "rank0.pt", weights_only=True)
    assert [r["world_size"] for r in ranks] == [2, 2] and reference["world_size"] == 1
    # Every rank made the same decisions from the same all-reduced gradients: masks and scores bit-identical.
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() and ranks[0]["masks"]
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name
    for name, scores in ranks[0]["method"].get("scores", {}).items():
        assert torch.equal(scores, ranks[1]["method"]["scores"][name]), name
    assert ranks[0]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    # DDP averages two half-batch gradients where one process averages the whole batch: equal up to rounding (plain
    # SGD, which keeps rounding small; Adam would turn the rounding noise of near-zero gradients into whole steps).
    compared = reference["weights"]
    for name, weight in compared.items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    for name, mask in reference["masks"].items():
        agree = (ranks[0]["masks"][name] == mask).float().mean().item()
        assert agree > 0.999, f"{name}: DDP and one process agree on {agree:.4%} of the mask"
    # The saved model (rank 0) is the single process's.
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(str(ddp / "model")).state_dict()
    for name, weight in compared.items():
        torch.testing.assert_close(saved[name], weight, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ FSDP2
FSDP_WORKER = Path(__file__).resolve().parent / "distributed" / "fsdp_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_fsdp2_ranks_agree_and_match_one_process(tmp_path, method):
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(FSDP_WORKER),
         str(fsdp), method], tmp_path)
    run([sys.executable, str(FSDP_WORKER), str(single), method], tmp_path)

    ranks = [torch.load(fsdp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reference = torch.load(single / "rank0.pt", weights_only=True)
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Each process held half of every weight; the scores were gathered and ranked whole, so the masks (kept whole
    # on every rank) are identical, and every shard of a pruned weight is zero.
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
        assert torch.all(ranks[0]["weights"][name][mask] == 0), name
    assert ranks[0]["sparsity"] == ranks[1]["sparsity"] == pytest.approx(0.75, abs=1e-3)  # counted over all shards
    for name, mask in reference["masks"].items():
        agree = (ranks[0]["masks"][name] == mask).float().mean().item()
        assert agree > 0.999, f"{name}: FSDP2 and one process agree on {agree:.4%} of the mask"
        torch.testing.assert_close(ranks[0]["weights"][name], reference["weights"][name], rtol=1e-4, atol=1e-5,
                                   msg=name)


@pytest.mark.slow
def test_an_fsdp2_movement_run_resumed_from_its_saved_state_ends_as_an_uninterrupted_one(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(FSDP_WORKER)]
    run(launch + [str(whole), "movement"], tmp_path)
    run(launch + [str(resumed), "movement", "resume"], tmp_path)
    # The state written at mid-run holds the whole scores (gathered from both shards), not rank 0's half.
    saved = torch.load(resumed / "checkpoint.pt", weights_only=True)["state"]
    first = next(iter(saved["method"]["scores"].values()))
    assert type(first) is torch.Tensor and first.shape == (32, 32)
    for rank in (0, 1):
        a = torch.load(whole / f"rank{rank}.pt", weights_only=True)
        b = torch.load(resumed / f"rank{rank}.pt", weights_only=True)
        for name, mask in a["masks"].items():
            assert torch.equal(mask, b["masks"][name]), name
            torch.testing.assert_close(b["scores"][name], a["scores"][name], rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(b["weights"][name], a["weights"][name], rtol=1e-5, atol=1e-7, msg=name)
        assert b["sparsity"] == pytest.approx(0.75, abs=1e-3)


# ------------------------------------------------------------------------------------------------ what is refused
def test_soft_movement_and_unit_pruning_are_refused_on_fsdp2_parameters(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from conftest import tiny_bert
    from hf_prune import PruningConfig, Pruner

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_bert()
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)  # real FSDP2: every parameter is now a DTensor shard
        Pruner(model, PruningConfig(target_sparsity=0.5))  # magnitude: supported
        with pytest.raises(ValueError, match=r"under FSDP2 .*method='soft_movement'"):
            Pruner(model, PruningConfig(method="soft_movement", target_sparsity=0.5))
        with pytest.raises(ValueError, match=r"under FSDP2 .*head_sparsity=0.5"):
            Pruner(model, PruningConfig(target_sparsity=0.0, head_sparsity=0.5))
    finally:
        dist.destroy_process_group()


def test_fsdp1_in_training_arguments_is_refused_before_training(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from hf_prune.sharding import check_unsharded

    # TrainingArguments(fsdp=...) exports ACCELERATE_USE_FSDP and FSDP_* variables: keep them out of later tests.
    monkeypatch.setattr(os, "environ", os.environ.copy())

    args = TrainingArguments(str(tmp_path), fsdp="full_shard", use_cpu=True, report_to=[], max_steps=1)
    # What the callback checks at the end of Trainer.__init__ (on a CPU-only machine Trainer itself stops earlier,
    # when accelerate looks for an FSDP device).
    with pytest.raises(ValueError, match=r"cannot prune under FSDP1 .*FSDP2 \(fully_shard, fsdp_version 2\)"):
        check_unsharded(args=args)
    fsdp2 = TrainingArguments(str(tmp_path), fsdp="full_shard", fsdp_config={"fsdp_version": 2}, use_cpu=True,
                              report_to=[], max_steps=1)
    check_unsharded(args=fsdp2)
    check_unsharded(args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))  # DDP / one process


def test_the_callback_rebuilds_its_pruner_when_accelerate_shards_the_model_in_place(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from conftest import tiny_bert
    from hf_prune import PruningCallback, PruningConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_bert()
        callback = PruningCallback(PruningConfig(method="movement", target_sparsity=0.5))
        before = callback.build(model)  # at Trainer.__init__: whole parameters
        assert not before.sharded
        fully_shard(model)  # what accelerate.prepare does for FSDP2, on the same module object
        after = callback.build(model)  # at on_train_begin
        assert after is not before and after.sharded
        assert callback.build(model) is after
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ causal-LM optimize
@pytest.mark.slow
def test_optimize_on_a_causal_lm_runs_under_ddp_with_every_rank_on_the_shape_rank_zero_chose(tmp_path):
    """`hf-prune optimize` on a causal LM under torchrun: candidates timed against a speed target differ between
    processes, so rank 0's measurements decide for all (else DDP would train two different shapes and hang); the
    search's short recoveries and the final one run in both processes; one model and one report are written."""
    import json
    import random

    from conftest import WORDS, tiny_causal_lm, tiny_tokenizer

    from hf_prune import load_pruned

    model_dir = tmp_path / "model"
    tiny_causal_lm("llama", layers=4).save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    rng = random.Random(0)
    for name, count in (("train.txt", 40), ("held_out.txt", 8)):
        text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(count))
        (tmp_path / name).write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_prune.cli",
         "optimize", "--model_name_or_path", str(model_dir), "--train_file", str(tmp_path / "train.txt"),
         "--validation_file", str(tmp_path / "held_out.txt"), "--block_size", "16", "--max_steps", "2",
         "--search_steps", "1", "--per_device_train_batch_size", "2", "--calibration_batches", "2",
         "--eval_tokens", "200", "--prompt_tokens", "8", "--decode_tokens", "4", "--benchmark_rounds", "1",
         "--timing_rounds", "1", "--fraction_step", "0.25", "--target_params", "0.8", "--target_speedup", "1.05",
         "--use_cpu", "--disable_tqdm", "true", "--output_dir", str(out)], tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["processes"] == 2
    chosen = [c for c in report["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["perplexity_after_search"] is not None
    model = load_pruned(str(out / "model"))
    ratio = sum(p.numel() for p in model.parameters()) / report["models"]["dense"]["parameters"]
    assert ratio == pytest.approx(chosen[0]["params_ratio"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind
