"""Writing a file or a folder in place of what is at a path, all or nothing: the one place where
moco_tf's writers (run configs, result files, model_dirs, TF-Hub exports, .pth.tar, .onnx,
KerasHub presets) make a write atomic and decide what an existing target may be replaced by.

- `write_atomic`: bytes at a path (local, or gs:// through tf.io.gfile), through a temporary file
  beside it that is renamed over it; `remove_temp_files` tidies what a kill left.
- `replace`: new content built in a staging folder beside the target, then swapped in; the old
  target is removed only once the new one is in place. `recover_leftovers` puts back a target a
  killed replacement had moved aside, and removes staging folders whose writer is gone.
- `check_existing_folder` / `check_existing_file`: an existing target is replaced only when
  moco_tf wrote it (read from its content) and overwrite was asked; `refuse_overlap`: never a
  target that is, contains or lies inside a path the caller protects (the source model_dir).
- a full disk is one line (`DiskFullError`, a RunFailed), whoever writes.

Ground floor: imports nothing of moco_tf but its errors and reporting, so every layer can use it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence

from moco_tf import reporting
from moco_tf.errors import RunFailed, UserError

log = logging.getLogger(__name__)

# Paths a target must keep clear of: plain paths are model_dirs; a mapping gives each path's
# description for the messages ({"ckpt.pth": "the torch checkpoint"}).
Protected = Sequence[str] | Mapping[str, str]

# A staging folder beside the target: `.NAME.XXXXXXXX.tmp` holding these entries and nothing else.
_NEW, _OLD, _OWNER, _SCRATCH = "new", "old", "owner.json", "scratch"
_STAGING_ENTRIES = frozenset({_NEW, _OLD, _OWNER, _SCRATCH})


class TargetError(FileExistsError, UserError):
    """A target may not be written or replaced; the message says why, in one line."""


class DiskFullError(RunFailed):
    """The disk filled up while writing; what was at the target before is intact. A `RunFailed`:
    the command lines report it in one line with exit status 1."""


# ----------------------------------------------------------------------------------------------
# a full disk


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (an OSError, or TensorFlow's error text) says the disk or the quota is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left" in str(error) or "Disk quota exceeded" in str(error)


def reason(error: BaseException) -> str:
    """`error` in a few words for a one-line message: "no space left on device", or its first line."""
    if is_disk_full(error):
        return "no space left on device"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def raise_if_disk_full(error: BaseException, what: str, target: str, previous: bool = True) -> None:
    """A DiskFullError in one line when `error` is a full disk; otherwise returns. `previous`:
    say whether the target's previous content is intact (a replacement) or not (a plain write)."""
    if not is_disk_full(error):
        return
    if not previous:
        raise DiskFullError(f"no space left on device while writing {target}; free some space and rerun") from None
    kept = f"the previous {what} is intact" if os.path.lexists(target) else f"no {what} was written"
    raise DiskFullError(
        f"no space left on device while writing {what} {target}; {kept}; free some space and rerun"
    ) from None


# ----------------------------------------------------------------------------------------------
# a file


def write_atomic(path: str, data: bytes) -> str:
    """`data` at `path`, all or nothing: a temporary file beside it (`.NAME.XXXXXXXX.tmp`, created
    with the permissions a plain open gives), fsynced, renamed over it. gs:// and other remote
    paths go through tf.io.gfile (the same temporary name, written, then renamed)."""
    if "://" in path:
        import tensorflow as tf

        tf.io.gfile.makedirs(os.path.dirname(path))
        temp = _temp_name(path)  # a user's own NAME.tmp beside it is never written over
        with tf.io.gfile.GFile(temp, "wb") as f:
            f.write(data)
        tf.io.gfile.rename(temp, path, overwrite=True)
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        temp = _temp_name(os.path.join(folder, os.path.basename(path)))
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    try:  # the rename itself survives a power loss once the folder is synced
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _temp_name(path: str) -> str:
    """`.NAME.XXXXXXXX.tmp` beside `path`: a name only write_atomic makes (remove_temp_files' pattern)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")


def remove_temp_files(path: str) -> list[str]:
    """Deletes the temporary files that killed `write_atomic`s of `path` left beside it; returns
    them. Call it only where no other process may be writing `path` (holding the run lock)."""
    import tensorflow as tf  # a remote folder too

    folder, name = os.path.split(path)
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}\.tmp\Z")
    removed = []
    if not tf.io.gfile.isdir(folder or "."):
        return removed
    for entry in tf.io.gfile.listdir(folder or "."):
        full = os.path.join(folder, entry)
        if pattern.match(entry) and not tf.io.gfile.isdir(full):
            tf.io.gfile.remove(full)
            removed.append(full)
    return removed


# ----------------------------------------------------------------------------------------------
# a folder (or a file written whole by a library): staging beside the target, then the swap
#
# The new content is written in a staging folder `.NAME.XXXXXXXX.tmp` beside the target; then the
# old target is moved into the staging folder (as `old`), the new one renamed to the target, and
# the staging folder with the old target removed. A kill at any point leaves a complete target,
# or (between the two renames) a complete old one in the staging folder, which the next
# `recover_leftovers` puts back.


def replace(
    target: str, write: Callable[[str], None], recheck: Callable[[], None] | None = None, what: str = "export"
) -> None:
    """Call write(path) to build the new content at a fresh `path` in a staging folder beside
    `target`, then put it at `target`; an existing target (already checked by the caller) is
    removed only after the new content is in place, and a failure at any point leaves the old one.

    recheck: called just before the swap, to refuse a target that changed in the meantime.
    A full disk while writing raises DiskFullError; the staging folder is removed in any case.
    """
    import tensorflow as tf  # writers fail with TensorFlow's errors too (a SavedModel, a checkpoint)

    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        # Same parent folder, so the renames stay on one filesystem and are atomic.
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    except OSError as error:
        raise_if_disk_full(error, what, target)
        raise
    try:
        with open(os.path.join(staging, _OWNER), "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        new = os.path.join(staging, _NEW)
        write(new)
        if recheck is not None:
            recheck()
        old = os.path.join(staging, _OLD)
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(new, target)
    except (OSError, tf.errors.OpError) as error:
        raise_if_disk_full(error, what, target)
        raise
    finally:
        _remove_staging(staging, target)


def scratch_folder(new: str) -> str:
    """A folder for a `replace` writer's working files (removed with the staging folder): inside
    the staging folder of `new`, the path its write was given."""
    path = os.path.join(os.path.dirname(new), _SCRATCH)
    os.makedirs(path, exist_ok=True)
    return path


def _remove_staging(staging: str, target: str) -> None:
    """Remove a staging folder; an old target inside it is put back first when the target is
    missing (the swap was interrupted), never deleted."""
    old = os.path.join(staging, _OLD)
    if not os.path.lexists(target) and (os.path.isdir(old) or os.path.isfile(old)):
        os.rename(old, target)
    shutil.rmtree(staging, ignore_errors=True)


def _staging_folders(target: str) -> list[str]:
    """Staging folders of ours beside target whose process is gone: our name pattern, and nothing
    inside but what `replace` puts there."""
    parent, name = os.path.split(os.path.abspath(target))
    pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp\Z")
    try:
        entries = os.listdir(parent)
    except OSError:  # no parent yet (or unreadable): nothing of ours there
        return []
    found = []
    for entry in sorted(entries):
        path = os.path.join(parent, entry)
        if not pattern.match(entry) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            if set(os.listdir(path)) <= _STAGING_ENTRIES and not _owner_alive(path):
                found.append(path)
        except OSError:
            continue
    return found


def _owner_alive(staging: str) -> bool:
    """Whether the process that made a staging folder may still be writing it. A process killed
    before it wrote owner.json left no owner."""
    try:
        with open(os.path.join(staging, _OWNER)) as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return True  # another machine's (cannot tell), or this process's own: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def recover_leftovers(target: str, is_complete: Callable[[str], bool]) -> list[str]:
    """Tidy up after a killed `replace` of `target`: when target is missing and a staging folder
    holds a complete previous version (is_complete), put it back; then remove our staging folders.
    Returns a line for each thing done (also printed on stderr)."""
    done = []
    leftovers = _staging_folders(target)
    if not os.path.lexists(target):
        olds = [os.path.join(s, _OLD) for s in leftovers if is_complete(os.path.join(s, _OLD))]
        if olds:
            newest = max(olds, key=os.path.getmtime)
            os.rename(newest, target)
            done.append(f"restored {target}, which an interrupted replacement had moved to {newest}")
    for staging in leftovers:
        if not os.path.lexists(target) and os.path.exists(os.path.join(staging, _OLD)):
            continue  # an old version we could not verify, and nothing in its place: keep it
        shutil.rmtree(staging, ignore_errors=True)
        done.append(f"removed {staging}, left by an interrupted write of {target}")
    for line in done:
        log.warning(line, extra=reporting.AS_IS)  # on stderr as it is
    return done


# ----------------------------------------------------------------------------------------------
# what a target may be


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(path: str, folder: str) -> bool:
    """path is folder or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overlap(target: str, protected: Protected, flag: str) -> None:
    """A target that is, contains or lies inside a protected path (or contains the current
    directory) would put the protected files at risk when it is replaced: TargetError."""
    real = _real(target)
    described = protected.items() if isinstance(protected, Mapping) else ((p, "the model_dir") for p in protected)
    for path, what in described:
        if not path or "://" in path:
            continue  # remote paths (gs://) never meet a local target
        other = _real(path)
        if real == other:
            how = "is"
        elif _within(other, real):
            how = "contains"
        elif _within(real, other):
            how = "is inside"
        else:
            continue
        raise TargetError(
            f"refusing --{flag}={target}: it {how} {what} {path}, which must stay untouched; "
            f"give --{flag} a folder of its own"
        )
    if _within(_real(os.getcwd()), real):
        raise TargetError(
            f"refusing --{flag}={target}: it is or contains the current directory; give --{flag} a folder of its own"
        )


def check_existing_folder(
    target: str,
    overwrite: bool,
    is_ours: Callable[[str], bool],
    entries: frozenset[str] | set[str] | None,
    what: str,
    not_ours: str,
    ours: str,
    overwrite_flag: str = "--overwrite",
    refusing: str | None = None,
    choose: str = "choose another export_dir",
) -> None:
    """The rule for a folder target that may exist (a TF-Hub export, a KerasHub preset, a converted
    model_dir): it may be absent or empty, or, with overwrite, one moco_tf wrote (`is_ours`, read
    from its content) holding nothing but its `entries` (None: `is_ours` checks them); anything
    else is a TargetError in one line. `what` / `ours` / `not_ours` word the format in those lines
    ("an export", "a moco_tf export"); `refusing` starts them, `choose` ends them."""
    refusing = refusing or f"refusing to replace {target}:"
    if os.path.islink(target):
        raise TargetError(f"{refusing} it is a symbolic link; give the folder it points to")
    if not os.path.exists(target):
        return
    if not os.path.isdir(target):
        raise TargetError(f"{refusing} it is a file{', not ' + what if what else ''}; {choose}")
    present = os.listdir(target)
    if not present:
        return  # an empty folder: nothing to lose
    if not is_ours(target):
        raise TargetError(f"{refusing} it is not {not_ours}; {choose}")
    foreign = sorted(set(present) - set(entries)) if entries is not None else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TargetError(f"{refusing} besides {ours} it holds {shown}; move them out or {choose}")
    if not overwrite:
        noun = ours.split()[-1]
        raise TargetError(f"{noun} {target} already exists; pass {overwrite_flag} to replace it")


def check_existing_file(
    target: str, overwrite: bool, is_ours: Callable[[str], bool], what: str, overwrite_flag: str = "--overwrite"
) -> None:
    """The same rule for a single-file target (.pth.tar, .onnx): absent, or (with overwrite) a file
    moco_tf wrote; never a folder, a symbolic link or anyone else's file."""
    refusing = f"refusing to replace {target}:"
    if os.path.islink(target):
        raise TargetError(f"{refusing} it is a symbolic link; give the file it points to")
    if not os.path.exists(target):
        return
    if os.path.isdir(target):
        raise TargetError(f"{refusing} it is a folder; give a file path for the {what}")
    if not is_ours(target):
        raise TargetError(f"{refusing} it is no {what} written by moco_tf; choose another path")
    if not overwrite:
        raise TargetError(f"{what} {target} already exists; pass {overwrite_flag} to replace it")
