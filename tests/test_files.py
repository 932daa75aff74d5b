"""Atomic writes: the old file survives a failed write, no temporary is left behind."""

from __future__ import annotations

import os

import pytest
import torch

from hf_prune.files import atomic_torch_save, atomic_write, atomic_write_text


def test_atomic_write_text_replaces_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(str(path), "one")
    atomic_write_text(str(path), "two")
    assert path.read_text() == "two"
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"x": torch.ones(2)}, str(path))

    def broken(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), broken)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["state.pt"]
