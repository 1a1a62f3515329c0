"""What every export format's writer (`moco_tf.interop.hub`, `.keras_hub`, `.torch`, `.onnx`)
needs before it writes: its optional dependency, imported only by that writer (a missing one is
one line naming the pip command: `require`), and, for a single-file target (.pth.tar, .onnx), the
export rules of `moco_tf.atomic_write` (only a file moco_tf wrote is ever replaced).

Apart from `moco_tf.interop.transfer` (which reads the source encoder through
`moco_tf.weights.pretrained`) so that the writers need not import the readers.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

from moco_tf.atomic_write import Protected, TargetError, check_existing_file, recover_leftovers, refuse_overlap
from moco_tf.errors import UserError

# extra name -> what `pip install` needs; the package's optional dependencies (pyproject.toml).
EXTRAS = {
    "keras_hub": "keras-hub safetensors",
    "torch": "torch --index-url https://download.pytorch.org/whl/cpu",
    "onnx": "tf2onnx onnxruntime",
}


class MissingExtraError(ImportError, UserError):
    """An optional dependency of one export format is not installed; the message names the pip command."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """import `module`, or raise MissingExtraError naming `pip install "moco_tf[extra]"`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed: pip install {EXTRAS[extra]} "
            f"(moco_tf's extra {extra}: pip install \".[{extra}]\" in its checkout)"
        ) from None


# ----------------------------------------------------------------------------------------------
# a single-file target (.pth.tar, .onnx): the export rules of moco_tf.atomic_write, for a file


def check_file_target(
    target: str,
    overwrite: bool,
    protected: Protected,
    is_ours: Callable[[str], bool],
    what: str,
    overwrite_flag: str = "--overwrite",
) -> None:
    """Raise TargetError (one line) unless `target` may be written: it does not exist, or it
    is a file moco_tf wrote (`is_ours`, read from its content) and overwrite was asked. Never a
    folder, a symbolic link, a file of anyone else, nor one of `protected`. Also tidies up after a
    write that was killed (a leftover staging folder; a previous file it had moved aside)."""
    if not target:
        raise TargetError("no export target given")
    refuse_overlap(target, protected, "export_dir")
    recover_leftovers(target, lambda path: os.path.isfile(path) and is_ours(path))
    check_existing_file(target, overwrite, is_ours, what, overwrite_flag)
