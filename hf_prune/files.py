"""Writing files so that a crash never leaves a half-written one in place of a good one."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator


def atomic_write(path: str, write: Callable[[str], Any]) -> str:
    """Call `write(tmp_path)`, then move the finished file onto `path` in one step; returns `path`.

    The temporary file has a unique name in the target directory (same file system, so `os.replace` is atomic, and
    two writers never share a temporary), is flushed to disk before the rename, and is removed if `write` fails:
    readers see the old file or the complete new one, never a part.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    """Write `text` (UTF-8) to `path` atomically; see `atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str) -> str:
    """`torch.save(obj, path)` atomically; see `atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def staged_directory(path: str) -> Iterator[str]:
    """Yield a fresh staging directory next to `path`; when the block succeeds, it replaces `path` (an earlier
    directory there is moved aside first and deleted only after the new one is in place). When the block fails, the
    staging directory is deleted and `path` is left as it was: a failed save never costs the previous good one."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.staging-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if os.path.exists(path):
        previous = os.path.join(parent, f".{name}.previous-{uuid.uuid4().hex[:8]}")
        os.replace(path, previous)
    try:
        os.replace(staging, path)
    except BaseException:
        if previous is not None:
            os.replace(previous, path)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
