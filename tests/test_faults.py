"""Nothing lost when a save runs out of space or two jobs share a folder: real processes, a real file-size limit
(RLIMIT_FSIZE: a write past it fails with EFBIG, as one fails with ENOSPC on a full disk), real flock."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_classification_data, tiny_bert, tiny_causal_lm, tiny_tokenizer, training_args

from hf_prune import PruningConfig, PruningTrainer, load_pruned, save_pruned
from hf_prune.cli import main
from hf_prune.export import is_onnx_available
from hf_prune.files import OutputDirInUse, hold_output_dir

# Jobs run in processes of their own, one thread each, and MKL told to give the same bits whatever the alignment of
# its buffers (Conditional Numerical Reproducibility): runs compared weight for weight must not differ by the last
# digit of a matmul, which Adam would magnify on weights whose gradient is almost zero.
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT", "HF_HUB_OFFLINE": "1"}

WORKER = Path(__file__).resolve().parent / "faults" / "fsize_worker.py"
LIMIT = 20_000  # bytes: config and JSON files fit, weights (tens of kB) do not


def run_worker(scenario: str, directory: Path) -> dict:
    result = subprocess.run([sys.executable, str(WORKER), scenario, str(directory), str(LIMIT)], env=JOB_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".staging-" in p.name or ".previous-" in p.name]


@pytest.fixture
def saved_classifier(tmp_path):
    model = tiny_bert()
    save_pruned(model, str(tmp_path / "model"))
    return tmp_path


@pytest.mark.parametrize("scenario", ["save_pruned", "save_model"])
def test_a_save_that_runs_out_of_space_leaves_the_previous_model_whole_and_says_so(saved_classifier, scenario):
    before = fingerprint(saved_classifier / "model")
    outcome = run_worker(scenario, saved_classifier)
    assert outcome["error"] == "NoSpaceError", outcome
    assert "the previous version is intact" in outcome["message"] and "model" in outcome["message"]
    assert fingerprint(saved_classifier / "model") == before
    assert no_leftovers(saved_classifier) == []
    load_pruned(str(saved_classifier / "model"))


def test_a_checkpoint_that_runs_out_of_space_keeps_the_earlier_checkpoint(saved_classifier):
    outcome = run_worker("checkpoint", saved_classifier)
    assert outcome["error"] == "NoSpaceError", outcome
    run = saved_classifier / "run"
    first = run / "checkpoint-1"
    assert json.loads((first / "trainer_state.json").read_text())["global_step"] == 1
    load_pruned(str(first))  # whole: weights, config and pruning state written before the limit
    # The second checkpoint's model never appeared: no folder whose weights are half written.
    second = run / "checkpoint-2"
    assert not (second / "model.safetensors").exists() and no_leftovers(run) == []


@pytest.mark.onnx
def test_an_export_that_runs_out_of_space_leaves_the_previous_export_whole(saved_classifier):
    if not is_onnx_available():
        pytest.skip("needs the onnx extra")
    from hf_prune import export_onnx

    export_onnx(str(saved_classifier / "model"), str(saved_classifier / "onnx"), optimize=None)
    before = fingerprint(saved_classifier / "onnx")
    outcome = run_worker("export", saved_classifier)
    assert outcome["error"] == "NoSpaceError" and "the previous version is intact" in outcome["message"], outcome
    assert fingerprint(saved_classifier / "onnx") == before
    assert no_leftovers(saved_classifier) == []


@pytest.mark.parametrize("command", ["oneshot", "optimize"])
def test_a_command_out_of_space_keeps_the_previous_model_and_says_so(tmp_path, command):
    argv = lm_job(tmp_path, command)  # optimize: on a causal LM, phases not reused, so the model is saved again
    assert main(argv) == 0
    before = fingerprint(tmp_path / "out" / "model")
    (tmp_path / "argv.json").write_text(json.dumps(argv[1:]), encoding="utf-8")
    outcome = run_worker(f"cli:{command}", tmp_path)
    assert outcome["error"] == "SystemExit" and "the previous version is intact" in outcome["message"], outcome
    assert fingerprint(tmp_path / "out" / "model") == before
    assert no_leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ concurrent jobs
HOLDER = """
import sys, time
from hf_prune.files import hold_output_dir
with hold_output_dir(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_job_on_a_folder_another_job_holds_refuses_and_runs_once_the_holder_dies(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(OutputDirInUse, match=rf"--output_dir {out} is in use by hf-prune \(pid {holder.pid}"):
            with hold_output_dir(str(out)):
                pass
        (tmp_path / "text.txt").write_text("some text", encoding="utf-8")
        with pytest.raises(SystemExit, match="is in use by hf-prune"):
            main(["oneshot", "--model_name_or_path", "unused", "--calibration_file", str(tmp_path / "text.txt"),
                  "--evaluation_file", str(tmp_path / "text.txt"), "--output_dir", str(out)])
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    deadline = time.time() + 10
    while True:
        try:
            with hold_output_dir(str(out)):
                break
        except OutputDirInUse:
            assert time.time() < deadline, "the lock outlived its holder"
            time.sleep(0.1)


def test_processes_other_than_rank_zero_do_not_take_the_folder(tmp_path, monkeypatch):
    with hold_output_dir(str(tmp_path / "out")):
        monkeypatch.setenv("RANK", "1")
        with hold_output_dir(str(tmp_path / "out")):  # the same job's other process
            pass


def test_a_trainer_save_after_a_full_disk_error_still_works_in_the_same_process(tmp_path):
    """The failed save left nothing that blocks the next one (no staging folder taken for a live one)."""
    model = tiny_bert()
    trainer = PruningTrainer(model=model, args=training_args(tmp_path / "run", max_steps=1),
                             pruning_config=PruningConfig(target_sparsity=0.5),
                             train_dataset=random_classification_data(n=8))
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    trainer.save_model(str(tmp_path / "model"))
    assert torch.equal(load_pruned(str(tmp_path / "model")).classifier.weight, model.classifier.weight)


# ------------------------------------------------------------------------------------------------ kill -9
def killed_at(argv: list[str], seconds: float) -> None:
    """Run `hf-prune ARGV` in a process and kill -9 it after `seconds` (or let it finish first)."""
    process = subprocess.Popen([sys.executable, "-m", "hf_prune.cli", *argv], env=JOB_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def lm_job(tmp_path: Path, command: str) -> list[str]:
    source = tmp_path / "lm"
    if not source.exists():
        tiny_causal_lm("llama").save_pretrained(source)
        tiny_tokenizer(source).save_pretrained(source)
        text = "\n\n".join(" ".join(["alpha", "beta", "gamma", "delta", "epsilon"][i % 5:] * 6) for i in range(60))
        (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    out = str(tmp_path / "out")
    if command == "oneshot":
        return ["oneshot", "--model_name_or_path", str(source), "--calibration_file", str(tmp_path / "text.txt"),
                "--evaluation_file", str(tmp_path / "text.txt"), "--sparsity", "0.5", "--calibration_samples", "4",
                "--calibration_length", "16", "--output_dir", out]
    return ["optimize", "--model_name_or_path", str(source), "--train_file", str(tmp_path / "text.txt"),
            "--validation_file", str(tmp_path / "text.txt"), "--block_size", "16", "--max_steps", "4",
            "--calibration_batches", "1", "--per_device_train_batch_size", "4", "--eval_tokens", "100",
            "--prompt_tokens", "4", "--decode_tokens", "2", "--benchmark_rounds", "1", "--fraction_step", "0.25",
            "--onnx_decode", "false", "--target_params", "0.9", "--resume_phases", "false", "--output_dir", out]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["oneshot", "optimize"])
def test_a_job_killed_at_any_moment_never_leaves_a_half_written_model_nor_loses_the_good_one(tmp_path, command):
    argv = lm_job(tmp_path, command)
    assert main(argv) == 0
    model_dir = tmp_path / "out" / "model"
    start = time.perf_counter()
    killed_at(argv, 600)  # the whole run in a process of its own: how long a kill can land in
    duration = time.perf_counter() - start
    good = fingerprint(model_dir)
    if command == "optimize":
        # Killed inside the Trainer's save into the staged OUT/model: the save's own staging folder is nested
        # (`..model.staging-*`), a leftover the next run must recognise too.
        # The nested folder lives for milliseconds on a tiny model: a busy machine can let a run end unseen (a CI
        # run did), so look often and try again; a run that ended is whole and becomes the good model.
        for _ in range(5):
            good = fingerprint(model_dir)
            if killed_when(argv, tmp_path / "out", "..model.staging-*", poll=0.002):
                break
        else:
            pytest.fail("five runs ended before their save was caught")
        assert fingerprint(model_dir) == good
    for fraction in (0.2, 0.5, 0.7, 0.85, 0.95):
        killed_at(argv, duration * fraction)
        now = fingerprint(model_dir)
        assert set(now) == set(good), f"killed at {fraction:.0%}: {sorted(set(now) ^ set(good))}"
        load_pruned(str(model_dir))  # whole: the previous model or a complete new one, never a part
        report = json.loads((tmp_path / "out" / "report.json").read_text())  # never half written either
        assert report
    assert main(argv) == 0  # and the next run cleans what the killed ones left beside the folder
    assert no_leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ long jobs continue
def test_a_checkpoint_cut_short_by_a_kill_is_skipped_when_resuming(tmp_path, caplog):
    from hf_prune.files import last_complete_checkpoint

    config = PruningConfig(target_sparsity=0.5, warmup_fraction=0.0, cooldown_fraction=0.0, pruning_interval=1)
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    data = random_classification_data(n=16)
    PruningTrainer(model=tiny_bert(), args=args, pruning_config=config, train_dataset=data).train()
    # As a kill -9 while Trainer saved checkpoint-6 leaves it: weights written, trainer_state.json never.
    partial = tmp_path / "checkpoint-6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((tmp_path / "checkpoint-4" / "model.safetensors").read_bytes()[:100])
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-6 was not written to the end" in caplog.text
    (partial / "trainer_state.json").write_text('{"global_step": 6, "log_hist')  # cut mid-write
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(str(tmp_path / "nothing-here")) is None
    # PruningTrainer.train(resume_from_checkpoint=True) takes checkpoint-4 (Trainer's own choice would be 6 and fail).
    resumed = PruningTrainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=6, save_strategy="no"),
                             pruning_config=config, train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6 and resumed.pruner.measured_sparsity() == pytest.approx(0.5, abs=1e-3)


def classifier_job(tmp_path: Path, command: str, out: str) -> list[str]:
    """`hf-prune train` or `hf-prune optimize` (classifier) on tiny CSVs, checkpoints every 2 of 8 steps."""
    from conftest import WORDS, save_named_classifier, write_csv

    source = tmp_path / "classifier"
    if not source.exists():
        save_named_classifier(source)
        for split, n in (("train", 48), ("validation", 18), ("test", 24)):
            rows = [(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5)), ("bad", "good", "meh")[i % 3])
                    for i in range(n)]
            write_csv(tmp_path / f"{split}.csv", rows)
    common = ["--model_name_or_path", str(source), "--train_file", str(tmp_path / "train.csv"), "--validation_file",
              str(tmp_path / "validation.csv"), "--test_file", str(tmp_path / "test.csv"), "--output_dir", out,
              "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size",
              "8", "--max_length", "16", "--use_cpu", "--disable_tqdm", "true"]
    if command == "train":
        return ["train", *common, "--target_sparsity", "0.5", "--pruning_interval", "1"]
    return ["optimize", *common, "--target_speedup", "1000", "--recovery_seeds", "3", "4", "--fraction_step", "0.25",
            "--max_fraction", "0.5", "--calibration_batches", "2", "--timing_rounds", "1", "--timing_repeats", "2",
            "--benchmark_rounds", "1", "--benchmark_repeats", "2"]


def killed_when(argv: list[str], folder: Path, pattern: str, timeout: float = 600, poll: float = 0.02) -> bool:
    """Run `hf-prune ARGV` in a process and kill -9 it as soon as a path matching `pattern` appears under `folder`
    (looked for every `poll` seconds); False when the run ended first."""
    process = subprocess.Popen([sys.executable, "-m", "hf_prune.cli", *argv], env=JOB_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if any(folder.glob(pattern)):
            process.kill()
            process.wait()
            return True
        time.sleep(poll)
    process.kill()
    process.wait()
    return False


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_pruned(str(folder)).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", pytest.param("optimize", marks=[
    pytest.mark.onnx, pytest.mark.skipif(not is_onnx_available(), reason="needs the onnx extra")])])
def test_a_long_job_killed_again_and_again_continues_to_the_result_of_an_uninterrupted_one(tmp_path, command):
    whole = str(tmp_path / "whole")
    start = time.perf_counter()
    killed_at(classifier_job(tmp_path, command, whole), 600)
    duration = time.perf_counter() - start
    results = "results.json" if command == "train" else "report.json"
    assert (Path(whole) / results).is_file()
    out = tmp_path / "out"
    argv = classifier_job(tmp_path, command, str(out))
    killed_at(argv, duration * 0.6)  # a moment of chance
    # Then at chosen moments: mid-way through a training phase, after a checkpoint of it, each time further on.
    moments = (["pruned/checkpoint-2", "pruned/checkpoint-6"] if command == "train"
               else ["recovery/*-seed3/checkpoint-2", "recovery/*-seed4/checkpoint-4"])
    for pattern in moments:
        assert killed_when(argv, out, pattern), f"the run ended before {pattern} appeared"
    # The last run in a process of its own as well: every step of both runs with the same threads (a test process's
    # thread count can differ, and on a random tiny model a last-digit difference can flip which seed is kept).
    killed_at(argv, 600)
    assert (out / results).is_file()
    models = ["dense", "pruned"] if command == "train" else ["model", "recovery/0.50-seed3/model",
                                                              "recovery/0.50-seed4/model"]
    for name in models:
        expected = weights(Path(whole) / name)
        for key, tensor in weights(out / name).items():
            torch.testing.assert_close(tensor, expected[key], msg=lambda m, name=name, key=key: f"{name}: {key}: {m}")
    reused = json.loads((out / results).read_text())["phases_reused"]
    if command == "train":
        assert reused == ["dense", "pruned (from its last checkpoint)"]
    else:
        assert reused[:4] == ["dense", "importance", "search", "recovery-0.50-seed3"]
    assert no_leftovers(out) == []
