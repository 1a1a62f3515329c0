"""A harness, not a list: every command line (train, knn, lincls, finetune, export, convert, plot)
against one shared table of hostile inputs, each expected to be refused before any work:

- output paths that are a user's file, a user's photo, a folder, the run's own config.json, a
  symbolic link to a user's file, a path inside a run's checkpoints/, a path in no folder;
- every integer and float flag of each command (walked from its flag definitions by
  tests/support/cli_driver.py, so a new flag is covered) at NaN, inf, -1 and 2**40, and --image_size at a
  size whose batch cannot fit in memory;
- bookkeeping that is not moco_tf's or is garbled: another program's config.json, another
  project's checkpoints, a garbled config.json, configs whose values break the flags' bounds
  (a 2**40 queue, width 10**6), a model_dir of another command, garbled and foreign result JSONs,
  a zero-filled run.lock in a folder that is not a run, flagfiles of random bytes or Latin-1 text,
  another project's TF checkpoints beside a moco_tf config.json;
- run folders (--model_dir) inside another moco_tf run or inside / equal to a SavedModel export.

Checks, per case: a nonzero exit status, exactly one line on stderr and no traceback, the line
naming the hostile input (its flag or its path) so a later, unrelated failure does not pass; and
for the whole table: every file the harness did not create is byte-for-byte unchanged and no new
file appeared outside the scratch folder. Every case runs in one process (tests/support/cli_driver.py
`all`: one TensorFlow start-up for the seven command lines); the base arguments of each command fail
late on purpose (no data, no model), so a check missing from the front shows as a wrong message,
not as minutes of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support.helpers import ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("train", "knn", "lincls", "finetune", "export", "convert", "plot")


def _snapshot(folder: str) -> dict[str, str]:
    """Relative path -> sha256 of every file (links: their target's name) under folder."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            if os.path.islink(path):
                found[os.path.relpath(path, folder)] = "link:" + os.readlink(path)
            elif name in files:
                found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def _pretrain_config(**model) -> dict:
    from moco_tf.training.config import PretrainConfig

    values = json.loads(PretrainConfig.from_flags({"arch": "resnet18", "width": 8, "cifar_stem": True,
                                                   "dim": 16, "queue_size": 64, "batch_size": 32}).to_json())
    values["model"].update(model)
    return values


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The hostile files, and `scratch`: the one folder the commands may write in."""
    from moco_tf.training.evaluation_config import FinetuneConfig, LinearConfig

    base = tmp_path_factory.mktemp("hostile")
    b = str(base)
    w = {"base": b, "scratch": os.path.join(b, "scratch")}
    os.makedirs(w["scratch"])
    os.makedirs(os.path.join(b, "user", "folder"))
    w["notes"] = os.path.join(b, "user", "notes.txt")
    open(w["notes"], "w").write("my notes\n")
    open(os.path.join(b, "user", "folder", "a.txt"), "w").write("a\n")
    w["folder"] = os.path.join(b, "user", "folder")
    w["photo"] = os.path.join(b, "user", "photo.png")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(w["photo"])
    w["link"] = os.path.join(b, "user", "link.png")
    os.symlink(w["photo"], w["link"])
    w["empty"] = os.path.join(b, "empty")
    os.makedirs(w["empty"])

    def folder(name: str, files: dict[str, str | bytes]) -> str:
        path = os.path.join(b, name)
        for rel, content in files.items():
            os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(os.path.join(path, rel), mode) as f:
                f.write(content)
        return path

    ckpt = {"checkpoint": 'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n',
            "ckpt-2.index": b"\0" * 64, "ckpt-2.data-00000-of-00001": b"\1" * 256,
            "ckpt-1.index": b"\0" * 64, "ckpt-1.data-00000-of-00001": b"\1" * 256}
    w["run"] = folder("run", {"config.json": json.dumps(_pretrain_config()), "checkpoints/checkpoint": "x"})
    w["run_config"] = os.path.join(w["run"], "config.json")
    w["foreign_config"] = folder("foreign_config", {"config.json": json.dumps(
        {"architectures": ["BertModel"], "hidden_size": 768, "arch": "resnet18"})})
    w["foreign_ckpt"] = folder("foreign_ckpt", ckpt)
    w["foreign_ckpt_nested"] = folder("foreign_ckpt_nested", {f"checkpoints/{k}": v for k, v in ckpt.items()})
    w["garbled_config"] = folder("garbled_config", {"config.json": b"\x00\xff{not json"})
    w["huge_queue"] = folder("huge_queue", {"config.json": json.dumps(_pretrain_config(queue_size=2**40))})
    w["huge_width"] = folder("huge_width", {"config.json": json.dumps(
        _pretrain_config(backbone={"arch": "resnet18", "width": 10**6, "cifar_stem": True}))})
    w["zero_lock"] = folder("zero_lock", {"run.lock": b"\0" * 64})
    # Another project's real TF checkpoints beside a moco_tf config.json: the config proves nothing
    # about the checkpoint, which must be refused as not fitting the network, not read as untrained weights.
    beside = _pretrain_config()
    beside["data"]["flip"] = False  # (no guardrail warning on digits: the one line stays alone)
    w["foreign_beside"] = folder("foreign_beside", {"config.json": json.dumps(beside)})
    _foreign_tf_checkpoints(os.path.join(w["foreign_beside"], "checkpoints"))
    w["an_export"] = folder("an_export", {"saved_model.pb": b"\x08\x01", "assets/moco_config.json": "{}"})
    lincls_config = LinearConfig(pretrained="/x/model", dataset="digits").to_json()
    finetune_config = FinetuneConfig(pretrained="/x/model", dataset="digits").to_json()
    w["lincls_garbled"] = folder("lincls_garbled", {"lincls_config.json": lincls_config,
                                                    "lincls_results.json": '[{"epoch": 1, "lr": '})
    w["lincls_foreign"] = folder("lincls_foreign", {"lincls_config.json": lincls_config,
                                                    "lincls_results.json": '{"accuracy": [0.5]}'})
    w["finetune_garbled"] = folder("finetune_garbled", {"finetune_config.json": finetune_config,
                                                        "finetune_results.json": "\0" * 32})
    w["user_final"] = folder("user_final", {"lincls_final.json": '{"mine": 1}',
                                            "finetune_final.json": '{"mine": 1}'})
    w["garbage_pth"] = os.path.join(b, "user", "garbage.pth.tar")
    open(w["garbage_pth"], "wb").write(b"PK\3\4 not really a zip")
    w["random_flags"] = os.path.join(b, "random.flags")
    open(w["random_flags"], "wb").write(bytes(np.random.default_rng(0).integers(128, 256, 300, dtype=np.uint8)))
    w["latin1_flags"] = os.path.join(b, "latin1.flags")
    open(w["latin1_flags"], "wb").write("--title=caf\u00e9\n".encode("latin-1"))
    w["before"] = _snapshot(b)
    return w


def _foreign_tf_checkpoints(folder: str) -> None:
    import tensorflow as tf

    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])), folder, max_to_keep=2)
    for _ in range(2):
        manager.save()


def _outputs(w, folders: bool = False) -> list[tuple[str, list[str]]]:
    """Hostile output paths and what the one line must name (the path, or a part of it). Folders
    written whole (exports) may be created with their parents: a missing parent is not hostile."""
    return [
        (w["notes"], [w["notes"]]),
        (w["photo"], [w["photo"]]),
        (w["folder"], [w["folder"]]),
        (w["run_config"], [w["run_config"]]),
        (w["link"], [w["link"]]),
        (os.path.join(w["run"], "checkpoints", "grid.png"), ["checkpoints"]),
    ] + ([] if folders else [(os.path.join(w["base"], "no_such_folder", "x.png"), ["no_such_folder"])])


def _table(w) -> dict[str, list[dict]]:
    """command -> cases: {"args", "names": what the line must mention (any of)} or a numeric template."""
    s, missing = w["scratch"], os.path.join(w["base"], "no_such_model")
    base = {
        # Each fails late (no such data / model) when nothing earlier refuses.
        "train": ["--dataset=folder", f"--data_dir={w['base']}/no_such_data", f"--model_dir={s}/train_run"],
        "knn": [f"--pretrained={missing}", "--dataset=digits"],
        "lincls": [f"--pretrained={missing}", "--dataset=digits", f"--model_dir={s}/lincls_run"],
        "finetune": [f"--pretrained={missing}", "--dataset=digits", f"--model_dir={s}/finetune_run"],
        "export": [f"--model_dir={missing}", f"--export_dir={s}/export"],
        "convert": [f"--torch_checkpoint={w['garbage_pth']}", f"--export_dir={s}/converted"],
        "plot": [f"--model_dir={w['empty']}", f"--out={s}/curves.png"],
    }
    digits_train = ["--flagfile=configs/quickstart.flags", "--batch_size=32", "--queue_size=64", "--bn_groups=2",
                    "--max_steps=1", "--knn_every=0", "--width=8"]
    table: dict[str, list[dict]] = {c: [] for c in COMMANDS}

    def add(command, args, *names):
        table[command].append({"args": [*base[command], *args], "names": list(names)})

    # Output paths: every flag that names a file or folder moco_tf writes.
    for path, names in _outputs(w):
        add("knn", [f"--retrieval_grid={path}"], "--retrieval_grid", *names)
        add("plot", [f"--out={path}"], "--out", *names)
    for path, names in _outputs(w, folders=True):
        add("export", [f"--export_dir={path}"], *names)
        add("convert", [f"--export_dir={path}"], *names)
        add("finetune", [f"--export_dir={path}"], *names)
        table["train"].append({"args": [*digits_train, f"--model_dir={s}/train_export", f"--export_dir={path}"],
                               "names": names})
    for command in ("lincls", "finetune"):
        add(command, [f"--model_dir={w['notes']}"], w["notes"])
        add(command, [f"--model_dir={w['user_final']}"], f"{command}_final.json")
    # Bookkeeping of another program, another command, or garbled.
    for name, names in (("foreign_config", ["not a moco_tf config"]), ("foreign_ckpt", ["checkpoints"]),
                        ("foreign_ckpt_nested", ["checkpoints"]), ("garbled_config", ["config.json"]),
                        ("huge_queue", ["--queue_size"]), ("huge_width", ["--width"]),
                        ("lincls_garbled", ["lincls"]), ("run", ["train run"])):
        if name != "run":
            add("train", [f"--model_dir={w[name]}"], w[name], *names)
            add("export", [f"--model_dir={w[name]}"], w[name])
            table["knn"].append({"args": [f"--pretrained={w[name]}", "--dataset=digits"], "names": [w[name]]})
        for command in ("lincls", "finetune"):
            if name not in ("lincls_garbled", "huge_queue", "huge_width", "garbled_config"):
                add(command, [f"--model_dir={w[name]}"], w[name])
    add("train", [f"--model_dir={w['finetune_garbled']}"], "finetune run")
    table["train"].append({"args": [*digits_train, f"--model_dir={w['zero_lock']}"], "names": ["run.lock"]})
    add("lincls", [f"--model_dir={w['lincls_garbled']}"], "lincls_results.json")
    add("lincls", [f"--model_dir={w['lincls_foreign']}"], "lincls_results.json")
    add("finetune", [f"--model_dir={w['finetune_garbled']}"], "finetune_results.json")
    add("finetune", [f"--model_dir={w['lincls_garbled']}"], "lincls run")
    add("lincls", [f"--model_dir={w['finetune_garbled']}"], "finetune run")
    add("plot", [f"--model_dir={w['notes']}"], w["notes"])
    # A checkpoint that does not fit the network its config.json describes.
    add("export", [f"--model_dir={w['foreign_beside']}"], "does not fit")
    table["knn"].append({"args": [f"--pretrained={w['foreign_beside']}", "--dataset=digits"],
                         "names": ["does not fit"]})
    # The recipe its config.json records: a resume, up to the restore.
    recorded = ["--arch=resnet18", "--width=8", "--cifar_stem", "--dim=16", "--queue_size=64", "--batch_size=32",
                "--noflip", "--max_steps=2", "--knn_every=0"]
    table["train"].append({"args": [*recorded, f"--model_dir={w['foreign_beside']}"], "names": ["does not fit"]})
    # A run folder inside another run's folder or inside / equal to an export (files would mix).
    for place, names in ((os.path.join(w["run"], "logs"), ["inside the moco_tf run"]),
                         (w["an_export"], ["SavedModel export"]),
                         (os.path.join(w["an_export"], "variables"), ["SavedModel export"])):
        for command in ("train", "lincls", "finetune"):
            add(command, [f"--model_dir={place}"], *names)
        table["convert"].append({"args": [f"--torch_checkpoint={w['garbage_pth']}", f"--model_dir={place}"],
                                 "names": names})
    # A run folder inside the image folder it trains on (it would become a class of the data).
    inside = ["--dataset=folder", f"--data_dir={w['folder']}", f"--model_dir={w['folder']}/run"]
    table["train"].append({"args": inside, "names": ["inside --data_dir"]})
    for command in ("lincls", "finetune"):
        add(command, inside, "inside --data_dir")
    for name in ("folder", "notes", "run", "foreign_ckpt", "foreign_config"):
        table["convert"].append({"args": [f"--torch_checkpoint={w['garbage_pth']}", f"--model_dir={w[name]}"],
                                 "names": [w[name]]})
    # Numbers: an image size whose batch cannot fit, then every numeric flag of every command.
    for command in ("train", "knn", "lincls", "finetune"):
        add(command, ["--image_size=100000"], "--image_size 100000 needs")
    for command in COMMANDS:
        table[command].append({"numeric": {"args": base[command], "float": ["nan", "inf", "-1"],
                                           "int": ["-1", str(2**40)]}})
        # Flagfiles that are not text.
        add(command, [f"--flagfile={w['random_flags']}"], "random.flags")
        add(command, [f"--flagfile={w['latin1_flags']}"], "latin1.flags")
    return table


def _run(table: dict[str, list[dict]], folder: str) -> dict[str, list[dict]]:
    """Every command's cases in one process (one TensorFlow start-up: the cheapest on 2 cores)."""
    cases_path, results_path = os.path.join(folder, "cases.json"), os.path.join(folder, "results.json")
    with open(cases_path, "w") as f:
        json.dump(table, f)
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "support", "cli_driver.py"), "all", cases_path, results_path],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.load(open(results_path))


def test_every_command_refuses_every_hostile_input_in_one_line_before_work(world, tmp_path):
    table = _table(world)
    results = _run(table, str(tmp_path))
    failures, sizes = [], {}
    for command in COMMANDS:
        wanted = [case for case in table[command] if "numeric" not in case]
        numeric = [r for r in results[command] if r["flag"]]
        sizes[command] = len(results[command])
        for got in results[command]:
            names = [f"--{got['flag']}"] if got["flag"] else wanted.pop(0)["names"]
            lines = [line for line in got["stderr"].splitlines() if line.strip()]
            ok = (
                got["code"] not in (0, None) and not got["traceback"] and "Traceback" not in got["stderr"]
                and len(lines) == 1 and any(name in lines[0] for name in names)
            )
            if not ok:
                failures.append((command, got["args"][-1:], names, got["code"], lines[-3:],
                                 (got["traceback"] or "")[-400:]))
        if command in ("train", "knn", "lincls", "finetune", "plot"):
            assert numeric, f"no numeric flag found for {command}"
    print("hostile cases per command:", sizes)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(map(str, failures))
    # Nothing the harness did not create was changed, and nothing new appeared outside scratch.
    after = _snapshot(world["base"])
    changed = sorted(p for p, digest in world["before"].items() if after.get(p) != digest)
    new = sorted(p for p in set(after) - set(world["before"]) if not p.startswith("scratch"))
    assert changed == [] and new == [], (changed, new)
