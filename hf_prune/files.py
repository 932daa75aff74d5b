"""Writing files so that a crash never leaves a half-written one in place of a good one."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)


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
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = no_space(err, path)
        if full is not None:
            raise full from err
        raise
    return path


# Errors that mean the disk (or a quota, or the process's file-size limit) has no room for what was being written.
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class NoSpaceError(OSError):
    """A save or export ran out of space; what was at its path before is intact (the message says which path)."""


def space_errno(err: BaseException) -> Optional[int]:
    """The errno of a failed write that ran out of space, found in `err` or what caused it, else None. Writers in
    Rust or C++ (safetensors, ONNX) raise their own exception types and name the OS error only in the message."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return err.errno
        match = re.search(r"os error (\d+)", str(err))
        if match and int(match.group(1)) in NO_SPACE:
            return int(match.group(1))
        if "No space left on device" in str(err) or "File too large" in str(err):
            return errno.ENOSPC if "No space" in str(err) else errno.EFBIG
        err = err.__cause__ or err.__context__
    return None


def no_space(err: BaseException, path: str) -> Optional[NoSpaceError]:
    """A NoSpaceError naming `path` for a write that failed for lack of space, else None."""
    code = None if isinstance(err, NoSpaceError) else space_errno(err)
    if code is None:
        return None
    before = "the previous version is intact" if os.path.exists(path) else "nothing was written there"
    error = NoSpaceError(f"writing {path} failed: {os.strerror(code)} (no space left on the device, a quota or the "
                         f"file-size limit); {before}. Free space and run again.")
    error.errno = code  # set after: OSError(errno, text) would prefix the text with "[Errno N]"
    return error


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


# Staging and backup folders are named `.NAME.staging-HOST-PID-RANDOM` / `.NAME.previous-HOST-PID-RANDOM` beside
# NAME, so a later call can tell those of a process that died (same host, PID gone) from those of one still running.
_STAGING, _PREVIOUS = "staging", "previous"
# Names earlier versions used (export's `.NAME.partial-*` / `.NAME.old-*`); without a PID, they are cleaned once old.
_LEGACY_KINDS = ("partial", "old")
LEGACY_LEFTOVER_SECONDS = 24 * 3600


# The HOST-PID of a staging folder's tag followed by its random part and the nested folder's own kind.
_NESTED_TAG = re.compile(r"([^-]+-\d+)-[0-9a-f]{8}\.(?:staging|previous)-")


def _process_tag() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _is_dead(tag: str) -> bool:
    host, _, pid = tag.rpartition("-")
    if host != socket.gethostname().replace("-", "_") or not pid.isdigit():
        return False  # another machine's (a shared file system): not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_leftovers(path: str) -> list[str]:
    """Clean what killed saves and exports left beside `path`; returns what was removed or restored.

    A staging folder of a dead process is deleted. A `previous` folder of a dead process is the last good version
    when the process died between moving it aside and moving the new one in: it is put back if `path` is missing,
    deleted otherwise. Folders of live processes (or of other machines) are left alone.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return []
    touched = []
    prefix = f".{name}."
    # A save into a staging folder (PruningTrainer.save_model called by a command that stages OUT/model) stages in
    # turn beside it: `..NAME.staging-TAG.staging-TAG2`. Killed there, it leaves that nested folder, which belongs to
    # the same dead process as the outer one (TAG) and is deleted with it.
    nested = f".{prefix}{_STAGING}-"
    for entry in sorted(os.listdir(parent)):
        if entry.startswith(nested):
            outer = _NESTED_TAG.match(entry[len(nested):])
            if outer is not None and _is_dead(outer.group(1)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                touched.append(f"removed {os.path.join(parent, entry)}")
            continue
        if not entry.startswith(prefix):
            continue
        kind, _, rest = entry[len(prefix):].partition("-")
        full = os.path.join(parent, entry)
        if kind in (_STAGING, _PREVIOUS):
            tag = rest.rsplit("-", 1)[0]
            if not _is_dead(tag):
                continue
        elif kind in _LEGACY_KINDS:
            if time.time() - os.path.getmtime(full) < LEGACY_LEFTOVER_SECONDS:
                continue
        else:
            continue
        if kind in (_PREVIOUS, "old") and not os.path.exists(path):
            os.replace(full, path)
            touched.append(f"restored {full} -> {path}")
        else:
            shutil.rmtree(full, ignore_errors=True)
            touched.append(f"removed {full}")
    return touched


def _link_tree(source: str, target: str) -> None:
    """Hard-link (copy where links are impossible) `source` to `target`: no data is copied on one file system."""
    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


@contextmanager
def staged_directory(path: str, carry_over: Optional[Callable[[str], bool]] = None) -> Iterator[str]:
    """Yield a fresh staging directory next to `path`; when the block succeeds, it replaces `path` in one rename.

    An earlier directory at `path` is moved aside first and deleted only after the new one is in place; when the block
    fails, the staging directory is deleted and `path` is left as it was: a failed save never costs the previous good
    one, and readers see the old set of files or the new one, never a mixture. Leftovers of killed processes beside
    `path` are cleaned first (`recover_leftovers`).

    Args:
        path: the directory to (re)place.
        carry_over: for an earlier directory at `path`, which of its entries (names) the new one keeps when the block
            did not write them (checkpoints, logs and other files beside a saved model); they are hard-linked into
            the staging directory before the swap. Default: none.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    recover_leftovers(path)
    tag = f"{_process_tag()}-{uuid.uuid4().hex[:8]}"
    staging = os.path.join(parent, f".{name}.{_STAGING}-{tag}")
    os.makedirs(staging)
    try:
        yield staging
        if carry_over is not None and os.path.isdir(path):
            for entry in os.listdir(path):
                if not os.path.lexists(os.path.join(staging, entry)) and carry_over(entry):
                    _link_tree(os.path.join(path, entry), os.path.join(staging, entry))
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        full = no_space(err, path)
        if full is not None:
            raise full from err
        raise
    previous = None
    if os.path.exists(path):
        previous = os.path.join(parent, f".{name}.{_PREVIOUS}-{tag}")
        os.replace(path, previous)
    try:
        os.replace(staging, path)
    except BaseException:
        if previous is not None:
            os.replace(previous, path)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


class OutputDirInUse(OSError):
    """Another process holds the output folder (`hold_output_dir`)."""


@contextmanager
def hold_output_dir(path: str, option: str = "--output_dir") -> Iterator[None]:
    """Hold `path` for this process while the block runs: a second hf-prune job given the same folder refuses at
    once (OutputDirInUse) instead of interleaving its files with the first one's.

    The lock is an advisory `flock` on `.NAME.lock` beside the folder (not inside it, which saves replace whole):
    the kernel releases it when the holder exits, killed or not, so a crashed job never leaves the folder locked.
    In a distributed run only process 0 (RANK 0) holds it: the others are the same job. Where `flock` is missing
    (Windows), nothing is held.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".{name}.lock")
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputDirInUse(errno.EBUSY, f"{option} {path} is in use by {holder}: two jobs writing one folder "
                                 f"would mix their files. Wait for it to finish, or give another {option}.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"hf-prune (pid {os.getpid()} on {socket.gethostname()})")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(folder: str) -> Optional[str]:
    """The newest `checkpoint-N` in `folder` that was written to the end, or None.

    Trainer writes a checkpoint's files in place and `trainer_state.json` last, so a process killed while saving
    leaves a `checkpoint-N` whose state file is missing or cut short; resuming from it would fail (or load a
    truncated optimizer). Such a folder is skipped with a warning and the one before it is taken.
    """
    if not os.path.isdir(folder):
        return None
    numbered = sorted(((int(m.group(1)), name) for name in os.listdir(folder)
                       if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(folder, name))), reverse=True)
    for _, name in numbered:
        path = os.path.join(folder, name)
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError):
            logger.warning(f"hf_prune: {path} was not written to the end (its trainer_state.json is missing or cut "
                           "short: the run was stopped while saving it); not resuming from it.")
            continue
        return path
    return None
