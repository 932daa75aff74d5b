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

WORKER = Path(__file__).resolve().parent / "faults" / "fsize_worker.py"
LIMIT = 20_000  # bytes: config and JSON files fit, weights (tens of kB) do not


def run_worker(scenario: str, directory: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(WORKER), scenario, str(directory), str(LIMIT)], env=env,
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hf_prune.cli", *argv], env=env, stdout=subprocess.DEVNULL,
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
    for fraction in (0.2, 0.5, 0.7, 0.85, 0.95):
        killed_at(argv, duration * fraction)
        now = fingerprint(model_dir)
        assert set(now) == set(good), f"killed at {fraction:.0%}: {sorted(set(now) ^ set(good))}"
        load_pruned(str(model_dir))  # whole: the previous model or a complete new one, never a part
        report = json.loads((tmp_path / "out" / "report.json").read_text())  # never half written either
        assert report
    assert main(argv) == 0  # and the next run cleans what the killed ones left beside the folder
    assert no_leftovers(tmp_path / "out") == []
