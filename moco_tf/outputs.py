"""One rule for every file moco_tf writes outside the checkpoints and exports (retrieval grids,
plots, result JSONs, evaluation configs):

- the path is checked before any work starts (`check_output`): not a folder, not a symbolic
  link, its folder exists and is writable, not a run's own bookkeeping (a model_dir's config
  files, run.lock, checkpoints/), and not an existing file that moco_tf did not write;
- "moco_tf wrote this file" is read from the file's content, never from its name: a PNG holds a
  tEXt chunk `Software: moco_tf` before its image data, a JSON object a `"format": "moco_tf.KIND"`
  key (`is_ours`);
- every write is atomic (`moco_tf.atomic_write.write_atomic`): a kill leaves the old file or the
  new one, never half of one.

Ground floor: imports nothing of moco_tf but its errors and atomic_write, so any layer can use it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from typing import Any

from moco_tf.atomic_write import write_atomic
from moco_tf.errors import UserError

MARKER = "moco_tf"
FORMAT_KEY = "format"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_SOFTWARE = b"Software"
Kind = str  # "png", or the kind of a marked JSON file: its name without .json (lincls_final, ...)
# A model_dir's own files, by the command that writes them: an output path never replaces them.
RUN_CONFIG_FILES = {"config.json": "train", "lincls_config.json": "lincls", "finetune_config.json": "finetune"}
RUN_FILES = frozenset({*RUN_CONFIG_FILES, "run.lock"})
RUN_FOLDERS = frozenset({"checkpoints"})
_MAX_JSON_BYTES = 64 << 20  # a results file of ours is a few KiB; a larger one is not read whole


class OutputError(UserError):
    """An output path moco_tf may not write, or a file of its own that it cannot read back."""


# ----------------------------------------------------------------------------------------------
# recognising our own files


def png_marked(png: bytes) -> bytes:
    """`png` with a tEXt chunk `Software: moco_tf` right after IHDR (before the image data, so
    `is_ours` finds it without reading the pixels)."""
    if not png.startswith(PNG_MAGIC):
        raise ValueError("not a PNG")
    ihdr_end = len(PNG_MAGIC) + 8 + struct.unpack(">I", png[8:12])[0] + 4
    body = b"tEXt" + _PNG_SOFTWARE + b"\0" + MARKER.encode()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _png_is_ours(path: str) -> bool:
    with open(path, "rb") as f:
        if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
            return False
        while True:  # chunks up to the image data; a truncated file is simply not recognised
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I", head[:4])[0], head[4:]
            if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                return False
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)  # crc
            if kind == b"tEXt" and data.startswith(_PNG_SOFTWARE + b"\0" + MARKER.encode()):
                return True


def read_marked_json(path: str) -> Any:
    """The JSON value of a file moco_tf wrote (`write_json`), or None when it is not one of ours
    (not JSON, not an object with our format key, too large, not UTF-8)."""
    try:
        if os.path.getsize(path) > _MAX_JSON_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if isinstance(value, dict) and str(value.get(FORMAT_KEY, "")).startswith(MARKER + "."):
        return value
    return None


def is_ours(path: str, kind: Kind) -> bool:
    """Whether the file at `path` carries moco_tf's marker for `kind` (its content, not its name):
    a JSON file of another kind (a results file where a final file goes) is not taken as this one."""
    try:
        if kind == "png":
            return _png_is_ours(path)
        value = read_marked_json(path)
        return value is not None and value[FORMAT_KEY] == f"{MARKER}.{kind}"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# checking a path before the work


def _is_run_folder(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES)


def _bookkeeping(path: str) -> str | None:
    """Why `path` is a run's own file (config, lock, checkpoints), or None."""
    folder, name = os.path.split(path)
    if name in RUN_FILES and _is_run_folder(folder):
        return f"the {name} of the run in {folder}"
    parts = path.split(os.sep)
    for i, part in enumerate(parts[:-1]):
        if part in RUN_FOLDERS and _is_run_folder(os.sep.join(parts[:i]) or os.sep):
            return f"inside the {part}/ of the run in {os.sep.join(parts[:i])}"
    return None


def check_output(
    path: str | None,
    flag: str,
    kind: Kind,
    protected: Iterable[str] = (),
) -> None:
    """Refuses, in one line naming `flag`, an output path moco_tf may not write: empty, a folder, a
    symbolic link, in a folder that does not exist or is not writable, a run's bookkeeping (or
    inside a `protected` folder's), or an existing file without moco_tf's marker for `kind`. Remote
    paths (gs://) are only checked for being empty."""
    if not path:
        raise OutputError(f"{flag} is empty: give a file path")
    if "://" in path:
        return
    shown = f"{flag}={path}" if flag.startswith("-") else f"{flag} {path}"  # a flag, or words ("the results file")
    if os.path.islink(path):
        raise OutputError(f"{shown} is a symbolic link: give the path of a real file (not replacing the link)")
    if os.path.isdir(path):
        raise OutputError(f"{shown} is a folder: give a file name")
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise OutputError(f"{shown}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: the folder {parent} is not writable")
    real = os.path.realpath(full)
    why = _bookkeeping(real)
    for folder in protected:  # a run folder of this command whose files may not exist yet
        root = os.path.realpath(folder)
        inner = os.path.relpath(real, root).split(os.sep)
        if inner[0] != ".." and (inner[0] in RUN_FOLDERS or (len(inner) == 1 and inner[0] in RUN_FILES)):
            why = why or f"a bookkeeping file of the run in {folder}"
    if why:
        raise OutputError(f"{shown} is {why}: pick another path")
    if os.path.exists(full) and not is_ours(full, kind):
        raise OutputError(
            f"{shown} exists and was not written by moco_tf: not replacing it; pick another path or remove the file"
        )


def check_output_folder(path: str | None, flag: str) -> None:
    """The part of the rule that folders written whole (exports, new model_dirs) share with files:
    never a run's bookkeeping (its config files, run.lock, its checkpoints/). What may already be
    there is the folder's writer's to check (moco_tf.interop.hub for exports)."""
    if not path or "://" in path:
        return
    why = _bookkeeping(os.path.realpath(os.path.abspath(path)))
    if why:
        raise OutputError(f"{flag}={path} is {why}: pick another path")


def check_run_place(path: str | None, flag: str) -> None:
    """A run's folder (--model_dir) is new or a run of its own, never a SavedModel export nor a
    folder inside one or inside another moco_tf run (its files would mix with theirs: a
    finetune in a pretraining run's logs/, a pretraining run in an export)."""
    if not path or "://" in path:
        return
    check_output_folder(path, flag)
    real = folder = os.path.realpath(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(folder, "saved_model.pb")):
            where = "" if folder == real else "inside "
            raise OutputError(f"{flag}={path} is {where}the SavedModel export {folder}: pick a folder of its own")
        if folder != real and _holds_moco_config(folder):
            raise OutputError(f"{flag}={path} is inside the moco_tf run {folder}: pick a folder of its own")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _holds_moco_config(folder: str) -> bool:
    """Whether `folder` holds a run config that moco_tf wrote (its `format_version` key), not by name alone."""
    for name in RUN_CONFIG_FILES:
        path = os.path.join(folder, name)
        try:
            if os.path.getsize(path) > _MAX_JSON_BYTES:
                continue
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError):  # absent, unreadable, not JSON (UnicodeDecodeError is one)
            continue
        if isinstance(value, dict) and "format_version" in value:
            return True
    return False


# ----------------------------------------------------------------------------------------------
# writing


def write_png(path: str, png: bytes) -> str:
    """PNG bytes at `path` with moco_tf's marker, atomically."""
    return write_atomic(path, png_marked(png))


def write_json(path: str, value: dict[str, Any] | list[Any], kind: str) -> str:
    """`value` as indented JSON marked `"format": "moco_tf.<kind>"`, atomically; a list is kept
    under "entries" (`read_json` gives it back as written)."""
    marked = {FORMAT_KEY: f"{MARKER}.{kind}"}
    marked.update(value if isinstance(value, dict) else {"entries": list(value)})
    return write_atomic(path, (json.dumps(marked, indent=2) + "\n").encode())


def read_json(path: str, kind: str) -> Any:
    """What `write_json(path, value, kind)` wrote, or an OutputError naming the file when it is
    garbled or not moco_tf's `kind`."""
    import tensorflow as tf  # any tf.io.gfile path

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            text = f.read()
        value = json.loads(text.decode("utf-8"))
    except (ValueError, tf.errors.OpError) as error:
        raise OutputError(f"{path} is not a moco_tf {kind} file ({_first_line(error)}); restore or remove it") from None
    if not isinstance(value, dict) or value.get(FORMAT_KEY) != f"{MARKER}.{kind}":
        marker = f'"{FORMAT_KEY}": "{MARKER}.{kind}"'
        raise OutputError(f"{path} is not a moco_tf {kind} file (no {marker}); restore or remove it")
    if set(value) == {FORMAT_KEY, "entries"}:
        return value["entries"]
    return {k: v for k, v in value.items() if k != FORMAT_KEY}


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
