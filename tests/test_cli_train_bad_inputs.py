"""A table of bad inputs across flags, flagfiles, data, model_dirs, checkpoints, exports and TF_CONFIG:
each ends in one line naming the problem, the right exit code (2: a user mistake) and no traceback,
and leaves the user's files as they were. All cases of one command line run in one process
(tests/support/cli_driver.py) to keep the suite fast."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support.helpers import ENV, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_digest(folder):
    """Names and contents of everything under folder: to show it was left untouched."""
    digest = hashlib.sha256()
    for top, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            digest.update(os.path.relpath(path, folder).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def _run_cases(command, cases, tmp_path):
    cases_path, results_path = tmp_path / f"{command}_cases.json", tmp_path / f"{command}_results.json"
    cases_path.write_text(json.dumps(cases))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "support", "cli_driver.py"), command, str(cases_path),
         str(results_path)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(results_path.read_text())


def _photos(folder, n=3):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(os.path.join(folder, f"photo{i}.jpg"))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the cases point at: user folders, broken model_dirs, a finished tiny run with its export."""
    base = tmp_path_factory.mktemp("world")
    w = {"base": str(base)}
    w["photos"] = _photos(str(base / "photos"))
    w["empty"] = str(base / "empty")
    os.makedirs(w["empty"])
    w["not_images"] = str(base / "not_images" / "class_a")
    os.makedirs(w["not_images"])
    open(os.path.join(w["not_images"], "notes.txt"), "w").write("not an image")
    w["truncated_jpeg_dir"] = str(base / "truncated")
    for cls in ("a", "b"):
        _photos(os.path.join(w["truncated_jpeg_dir"], cls), 4)
    good = open(os.path.join(w["truncated_jpeg_dir"], "a", "photo1.jpg"), "rb").read()
    # Cut in the middle of the scan, end marker kept: a file a check of header and tail passes.
    open(os.path.join(w["truncated_jpeg_dir"], "a", "photo1.jpg"), "wb").write(good[: len(good) // 2] + b"\xff\xd9")
    for name, content in (("bad_json", "{\"arch\": \"resnet18\", "), ("list_json", "[1, 2]")):
        os.makedirs(base / name)
        (base / name / "config.json").write_text(content)
    os.makedirs(base / "garbage_ckpt" / "checkpoints")
    def config(**sections):  # a config.json in moco_tf's format, recording only what is given
        return json.dumps({"format_version": 2, **sections})

    tiny_backbone = {"backbone": {"arch": "resnet18", "width": 8, "cifar_stem": True}}  # always recorded
    (base / "garbage_ckpt" / "config.json").write_text(config(model=tiny_backbone))
    (base / "garbage_ckpt" / "checkpoints" / "checkpoint").write_text("garbage record\n")
    (base / "garbage_ckpt" / "checkpoints" / "ckpt-5.index").write_bytes(b"not an index")
    (base / "garbage_ckpt" / "checkpoints" / "ckpt-5.data-00000-of-00001").write_bytes(b"\0" * 100)
    os.makedirs(base / "other_recipe")
    (base / "other_recipe" / "config.json").write_text(
        config(model={**tiny_backbone, "temperature": 0.2, "shuffle_bn": False})
    )
    os.makedirs(base / "no_arch")
    (base / "no_arch" / "config.json").write_text(config(model={"temperature": 0.2}))
    w["a_file"] = str(base / "a_file")
    open(w["a_file"], "w").write("x")
    (base / "bad_line.flags").write_text("--lr=abc\n")
    (base / "unknown.flags").write_text("--no_such_flag=1\n")

    # A finished tiny run and its export, for the export cases.
    w["run"] = str(base / "run")
    w["export"] = str(base / "export")
    result = subprocess.run(
        [sys.executable, "-m", "moco_tf.train", *TINY, f"--model_dir={w['run']}", "--max_steps=2",
         f"--export_dir={w['export']}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    w["digests"] = {k: _tree_digest(w[k]) for k in ("photos", "run", "export")}
    return w


def _train_cases(w):
    b, run = w["base"], lambda *a: [*TINY, f"--model_dir={w['base']}/fresh", *a]
    cfg = lambda **kv: json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, **kv})  # noqa: E731
    return [
        # flags: ranges, NaN, infinities, combinations
        (run("--lr=nan"), "--lr must be a finite number > 0, got nan"),
        (run("--lr=-0.1"), "--lr must be a finite number > 0, got -0.1"),
        (run("--lr=inf"), "--lr must be a finite number > 0, got inf"),
        (run("--temperature=0"), "--temperature must be a finite number > 0"),
        (run("--temperature=nan"), "--temperature must be a finite number > 0"),
        (run("--moco_momentum=1.0"), "--moco_momentum must be a finite number in [0, 1)"),
        (run("--moco_momentum=-0.5"), "--moco_momentum must be a finite number in [0, 1)"),
        # main_moco.py's --momentum is SGD's: which one was meant is not guessed
        (run("--momentum=0.9"), "--momentum is ambiguous here: use --sgd_momentum (SGD, the official --momentum) "
                                "or --moco_momentum (the key encoder's m, the official --moco-m)"),
        (run("--sgd_momentum=1.5"), "--sgd_momentum must be a finite number in [0, 1)"),
        (run("--weight_decay=-1e-4"), "--weight_decay must be a finite number >= 0"),
        (run("--knn_t=0"), "--knn_t must be a finite number > 0"),
        (run("--stop_grace_s=-1"), "--stop_grace_s must be a finite number > 0"),
        (run("--checkpoint_every=-1"), "--checkpoint_every must be >= 0, got -1"),
        (run("--max_steps=-5"), "--max_steps must be positive (or unset), got -5"),
        (run("--steps_per_epoch=-3"), "--steps_per_epoch must be positive (or unset), got -3"),
        (run("--keep_checkpoints=0"), "--keep_checkpoints must be positive, got 0"),
        (run("--epochs=0"), "--epochs must be positive, got 0"),
        (run("--width=0"), "--width must be positive, got 0"),
        (run("--image_size=4"), "too small"),
        (run("--queue_size=100"), "not a multiple of the keys"),
        (run("--milestones=a,b"), "--milestones must be epochs (integers), got a,b"),
        (run("--milestones=-5"), "--milestones must be positive epochs"),
        (run("--warmup_epochs=10"), "--warmup_epochs 10 is more than --epochs 3"),
        (run("--seed=-1"), "--seed must be in [0, 2**31), got -1"),
        (run("--batch_size=30", "--bn_groups=4", "--queue_size=60"), "is not divisible by --bn_groups"),
        (run("extra_word"), "unexpected arguments: extra_word"),
        # flag parsing and flagfiles (absl's own one-line errors, exit 1)
        (run("--arch=resnet19"), "resnet19"),
        (run("--epochs=abc"), "abc"),
        (run("--no_such_flag=1"), "no_such_flag"),
        (run(f"--flagfile={b}/no_such.flags"), "no_such.flags"),
        (run(f"--flagfile={b}/bad_line.flags"), "abc"),
        (run(f"--flagfile={b}/unknown.flags"), "no_such_flag"),
        # data
        (run("--dataset=no_such_dataset_xyz"), "no_such_dataset_xyz"),
        (run("--dataset=folder", "--data_dir=/nonexistent/images"), "/nonexistent/images"),
        (run("--dataset=folder"), "--data_dir"),
        (run("--dataset=folder", f"--data_dir={w['empty']}"), w["empty"]),
        (run("--dataset=folder", f"--data_dir={os.path.dirname(w['not_images'])}"), "no readable images"),
        (run(f"--data_dir={w['photos']}"), "--data_dir is not used with --dataset=digits"),
        (run("--dataset=folder", f"--data_dir={w['truncated_jpeg_dir']}", "--strict_data", "--image_size=16"),
         "photo1.jpg"),
        # model_dirs and checkpoints
        ([*TINY, "--model_dir=/proc/moco_tf_cannot_write"], "not writable"),
        ([*TINY, f"--model_dir={w['a_file']}"], w["a_file"]),
        ([*TINY, f"--model_dir={b}/bad_json"], f"{b}/bad_json/config.json is not valid JSON"),
        ([*TINY, f"--model_dir={b}/list_json"], f"{b}/list_json/config.json does not hold a moco_tf config"),
        ([*TINY, f"--model_dir={b}/garbage_ckpt"], "none is readable; refusing to start over at step 0"),
        ([*TINY, f"--model_dir={b}/other_recipe"], "--temperature=0.2 (now 0.1), --shuffle_bn=False (now True)"),
        ([*TINY, f"--model_dir={b}/no_arch"], f"{b}/no_arch/config.json: the config records no backbone (arch)"),
        # exports named at the start of training
        (run(f"--export_dir={b}/fresh"), "model_dir"),
        (run(f"--export_dir={b}"), "model_dir"),
        (run(f"--export_dir={w['photos']}"), "not a moco_tf export"),
        (run(f"--export_dir={w['export']}"), "--overwrite_export"),
        # TF_CONFIG and strategies
        (run("--strategy=multi_worker"), "TF_CONFIG"),
        (run(), "TF_CONFIG", {"TF_CONFIG": "[1,2]"}),
        (run(), "TF_CONFIG is not valid JSON", {"TF_CONFIG": "{not json"}),
        (run(), "TF_CONFIG", {"TF_CONFIG": cfg(task={"type": "worker", "index": 5})}),
        (run(), "TF_CONFIG", {"TF_CONFIG": cfg(task={"type": "ps", "index": 0})}),
        (run("--strategy=tpu"), "no TPU found"),
    ]


def test_bad_inputs_give_one_line_the_right_exit_code_and_no_traceback(world, tmp_path):
    table = _train_cases(world)
    cases = [{"args": args, "env": extra[0] if extra else {}} for args, _, *extra in table]
    # A second run on a model_dir in use.
    cases.append({"args": [*TINY, f"--model_dir={world['run']}"], "lock": world["run"]})
    expected = [message for _, message, *_ in table] + ["is in use by another run (pid"]
    results = _run_cases("train", cases, tmp_path)
    failures = []
    for case, want, got in zip(cases, expected, results, strict=True):
        absl_parse_error = any(w in want for w in ("resnet19", "abc", "no_such_flag", "no_such.flags"))
        code = 1 if absl_parse_error else 2
        lines = [line for line in got["stderr"].splitlines() if line.strip()]
        if got["traceback"] or "Traceback" in got["stderr"] or got["code"] != code or want not in got["stderr"]:
            failures.append((case["args"][-2:], case.get("env"), want, got["code"], got["stderr"][-600:],
                             (got["traceback"] or "")[-600:]))
        elif not absl_parse_error and len(lines) != 1:
            failures.append((case["args"][-2:], "more than one line", lines))
    assert not failures, "\n".join(map(str, failures))
    assert len(cases) >= 40
    # Nothing the cases touched was changed.
    for key, digest in world["digests"].items():
        assert _tree_digest(world[key]) == digest, key


def test_export_and_convert_command_lines(world, tmp_path):
    run, b = world["run"], world["base"]
    # The newest checkpoint truncated (a kill or a full disk while copying): the previous one is used.
    truncated = str(tmp_path / "truncated_run")
    shutil.copytree(run, truncated)
    data = os.path.join(truncated, "checkpoints", "ckpt-2.data-00000-of-00001")
    open(data, "r+b").truncate(os.path.getsize(data) // 2)
    export_cases = [
        (["--model_dir=" + truncated, f"--export_dir={tmp_path}/from_truncated"], 0, "ckpt-2"),
        ([f"--model_dir={run}/checkpoints/ckpt-1", f"--export_dir={tmp_path}/from_prefix"], 0, "exported"),
        ([f"--model_dir={run}/checkpoints/ckpt-99", f"--export_dir={tmp_path}/x"], 2, "does not exist"),
        ([f"--model_dir={run}", f"--export_dir={run}"], 2, "model_dir"),
        ([f"--model_dir={run}", f"--export_dir={b}"], 2, "model_dir"),
        ([f"--model_dir={run}", f"--export_dir={world['photos']}", "--overwrite"], 2, "not a moco_tf export"),
        ([f"--model_dir={run}", f"--export_dir={world['export']}"], 2, "--overwrite"),
        ([f"--model_dir={run}"], 2, "both --model_dir and --export_dir are required"),
        ([f"--model_dir={world['a_file']}", f"--export_dir={tmp_path}/y"], 2, world["a_file"]),
    ]
    convert_cases = [
        ([f"--torch_checkpoint={world['photos']}", f"--export_dir={tmp_path}/z"], 2, world["photos"]),
        ([f"--export_dir={tmp_path}/z"], 2, "--torch_checkpoint is required"),
        ([f"--torch_checkpoint={b}/no_such.pth.tar", f"--export_dir={tmp_path}/z"], 2, "no_such.pth.tar"),
    ]
    failures = []
    for command, table in (("export", export_cases), ("convert", convert_cases)):
        results = _run_cases(command, [{"args": args} for args, _, _ in table], tmp_path)
        for (args, code, want), got in zip(table, results, strict=True):
            text = got["stderr"] + got["stdout"]
            if got["traceback"] or "Traceback" in text or got["code"] != code or want not in text:
                failures.append((command, args, code, want, got["code"], text[-800:], (got["traceback"] or "")[-800:]))
    assert not failures, "\n".join(map(str, failures))
    assert os.path.exists(os.path.join(tmp_path, "from_truncated", "saved_model.pb"))
    for key, digest in world["digests"].items():
        assert _tree_digest(world[key]) == digest, key
