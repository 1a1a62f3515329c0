"""One run per model_dir: a lock file naming its owner (pid, host, start time).

The lock is an `fcntl.flock` on model_dir/run.lock, held for the life of the process: the kernel
releases it when the process dies however it dies (SIGKILL included), so a lock left by a dead
run is recognised as stale and taken over, and a live one makes the second run stop with a line
saying who holds it. Not enforced on object stores (gs://), which have no file locks: there, one
writer per model_dir is the user's responsibility.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from moco_tf.errors import UserError
from moco_tf.outputs import RUN_CONFIG_FILES

LOCK_FILE = "run.lock"


class RunLockedError(UserError):
    """Another live process is training in this model_dir."""


class RunLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._fd: int | None = None
        self.previous: dict | None = None  # the owner of a stale lock that was taken over

    def acquire(self) -> RunLock:
        if "://" in self.path:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        existed = os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _describe(_read(fd))
            os.close(fd)
            raise RunLockedError(
                f"{os.path.dirname(self.path)} is in use by another run ({owner}); wait for it to end or use "
                "another --model_dir"
            ) from None
        self.previous = _read(fd) or None
        if existed and not (self.previous or {}).get("pid"):
            raw = os.pread(fd, 4096, 0)
            if _torn(raw) and _is_moco_tf_run(os.path.dirname(self.path)):
                # What a power loss leaves (the record never reached the disk): nobody holds the flock,
                # and the folder is one of our runs, so the file is ours; a note says it was taken over.
                self.previous = {"torn": f"{len(raw)} bytes" if raw else "empty"}
            elif raw:
                # A file of the user's that happens to be called run.lock: never overwrite it.
                os.close(fd)
                raise RunLockedError(
                    f"{self.path} exists and is not a moco_tf run lock; move it away or use another --model_dir"
                )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner_record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding it, so no second run can lock the file we are deleting.
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_previous(lock: RunLock) -> str | None:
    """One line about a stale lock that `lock` took over, or None."""
    if not lock.previous:
        return None
    if "torn" in lock.previous:
        return (f"took over a torn {LOCK_FILE} ({lock.previous['torn']}: what a power loss or a full disk leaves); "
                "no process held it")
    return f"took over the lock of a run that is no longer running ({_describe(lock.previous)})"


def _torn(raw: bytes) -> bool:
    """Empty, zero-filled, or the start of our own record cut short."""
    text = raw.rstrip(b"\0")
    return not text or (text.startswith(b'{"pid"') and not text.rstrip().endswith(b"}"))


def _is_moco_tf_run(model_dir: str) -> bool:
    """The folder holds a run's config or checkpoints: a run.lock there is the run's."""
    names = (*RUN_CONFIG_FILES, "checkpoints")
    return any(os.path.exists(os.path.join(model_dir, name)) for name in names)


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
