"""The package's layers, read from the source (no import): the library never imports a command
line, moco_tf.cli or absl; each module imports only from its own level or below; no import
cycles; the command lines stay thin."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "moco_tf")
COMMAND_LINES = ("train", "knn", "lincls", "finetune", "export", "convert", "plot")
# Lowest first. The optimizer and the schedules import nothing of moco_tf: the linear protocol
# (evaluation) trains with them too, so they sit with the ground floor, not with training; the
# checkpoint finder too (lincls and finetune resume as train does), and the declaration of
# settings and the named recipes (plain values), which every config reads. Atomic writes and the rules for
# replacing a target (atomic_write) serve every writer. A run's recipe (training.config, with the
# strategies it names) and its model_dir (training.checkpoint) sit below the readers of weights
# (weights: model_dir, checkpoint, TF-Hub export, .pth), which sit below training: pretraining
# reads --init_from itself, and the data only goes down. The writers for the outside world
# (interop: exports, conversions) sit above training.
LEVELS = {
    "errors": 0, "_quiet_tf_startup": 0, "atomic_write": 0, "outputs": 0, "reporting": 0,
    "models": 1, "data": 1, "training.optimizers": 1, "training.schedules": 1, "training.checkpoint_files": 1,
    "training.settings": 1, "training.recipes": 1,
    "evaluation": 2,
    "training.config": 3, "training.evaluation_config": 3, "training.distribute": 3, "training.checkpoint": 3,
    "weights": 4,
    "training": 5,
    "interop": 6,
    "cli": 7,
    **{name: 8 for name in COMMAND_LINES},
}
MAX_COMMAND_LINE_LINES = 200


def _modules() -> dict[str, str]:
    """Dotted name under moco_tf ("" for the package itself) -> file path."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, PACKAGE)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: str) -> tuple[set[str], set[str]]:
    """(moco_tf modules, other top-level packages) that a file imports, lazy imports included."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from moco_tf.x import y`: y may be a module of x, or a name defined in x (an import of x).
            inner = [f"{node.module}.{alias.name}" for alias in node.names]
            modules = [n for n in inner if n.startswith("moco_tf.") and n[len("moco_tf."):] in MODULES]
            names = modules if len(modules) == len(inner) else [*inner, node.module]
        else:
            continue
        for name in names:
            if name == "moco_tf" or name.startswith("moco_tf."):
                inner = name[len("moco_tf.") :] if name != "moco_tf" else ""
                if inner in MODULES:
                    ours.add(inner)
            else:
                others.add(name.split(".")[0])
    return ours, others


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _level(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LEVELS:
            return LEVELS[".".join(parts[:n])]
    return None


def _is_library(module: str) -> bool:
    return module not in COMMAND_LINES and module != "cli" and not module.startswith("cli.")


def test_every_module_has_a_level():
    assert [m for m in MODULES if m and _level(m) is None] == []


def test_the_library_imports_no_command_line_and_no_absl():
    wrong = {}
    for module, (ours, others) in GRAPH.items():
        if not _is_library(module):
            continue
        bad = sorted(m for m in ours if not _is_library(m)) + sorted(p for p in others if p == "absl")
        if bad:
            wrong[module] = bad
    assert wrong == {}


def test_imports_go_down_the_levels():
    upward = {}
    for module, (ours, _) in GRAPH.items():
        if not module:
            continue  # the package's lazy `moco_tf.MoCo`
        mine = _level(module)
        bad = sorted(m for m in ours if m and _level(m) > mine)
        if bad:
            upward[module] = bad
    assert upward == {}


def test_no_import_cycles():
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(GRAPH[module][0]):
            if other == module or not other:
                continue
            if state.get(other) == "open":
                cycles.append(path[path.index(other) :] + [other] if other in path else [module, other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("name", COMMAND_LINES)
def test_command_lines_are_thin(name):
    with open(MODULES[name]) as f:
        lines = sum(1 for _ in f)
    assert lines <= MAX_COMMAND_LINE_LINES, f"moco_tf/{name}.py has {lines} lines: move the logic into the library"


def test_every_test_module_follows_the_naming_scheme_and_is_on_the_map():
    tests = os.path.join(ROOT, "tests")
    names = sorted(f[: -len(".py")] for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py"))
    owners = {m.split(".")[0] for m in MODULES if m} | {"cli", "run", "project", "benchmarks"}
    wrong = [n for n in names if n[len("test_"):].split("_")[0] not in owners
             and not any(n[len("test_"):].startswith(m.replace(".", "_").lstrip("_")) for m in MODULES if m)]
    assert wrong == []
    scripts = [f for f in os.listdir(tests) if f.endswith(".py") and not f.startswith("test_")]
    assert sorted(scripts) == ["__init__.py", "conftest.py"]  # support scripts live in tests/support/
    the_map = open(os.path.join(tests, "README.md")).read()
    assert [n for n in names if f"`{n}`" not in the_map] == []
