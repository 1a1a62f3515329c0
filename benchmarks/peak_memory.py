"""Peak resident memory (CPU) of MoCo training steps: moco_tf against the PyTorch reference step.

    python benchmarks/peak_memory.py                       # ResNet-50, 224 px, batch 32, K 65536
    python benchmarks/peak_memory.py --arch=resnet18 --image_size=32 --steps=2

Each framework runs in its own fresh process (`--child=moco_tf|torch`), which reports its peak
resident set (getrusage ru_maxrss) after imports, after building the model and after `--steps`
train steps on one fixed batch (queue 65536, dim 128, the v2 MLP head, T 0.2, SGD momentum 0.9):
- moco_tf: `MoCo` compiled with moco_tf's SGD and trained with `fit` on a repeated in-memory
  batch, as benchmarks/step_time.py times it (its `time_moco_tf`).
- torch: the official step of tests/support/torch_reference.py (`OfficialMoCo`, `DemoTrainer.step`) from
  a random init. The torch process imports no TensorFlow: torch_reference's one moco_tf import
  (`moco_tf.models.resnet.feature_dim`, which would load TensorFlow and Keras) is stood in for.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def views_batch(args):
    import numpy as np

    shape = (args.batch_size, 2, args.image_size, args.image_size, 3)
    return np.random.RandomState(0).randn(*shape).astype("float32")


def child_moco_tf(args, report) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.step_time import LR, WD, time_moco_tf
    from moco_tf.models.moco import MoCo
    from moco_tf.training.optimizers import SGD

    report("imports")
    model = MoCo(args.arch, dim=128, queue_size=args.queue_size, moco_momentum=0.999, temperature=0.2, mlp=True,
                 image_size=args.image_size)  # fmt: skip
    model.compile(optimizer=SGD(LR, momentum=0.9, weight_decay=WD), jit_compile=args.jit_compile)
    views = views_batch(args)
    report("model")
    seconds = time_moco_tf(model, views, args.steps)
    report("steps", seconds_per_step=seconds)


def child_torch(args, report) -> None:
    # tests/torch_reference imports moco_tf.models.resnet for one helper: stand it in, so that
    # this process holds torch alone (TensorFlow's import is ~0.5 GB of its own).
    from importlib import import_module

    stub = types.ModuleType("moco_tf.models.resnet")
    stub.feature_dim = lambda arch, width=64: 8 * width * (4 if int(arch.removeprefix("resnet")) >= 50 else 1)
    for name in ("moco_tf", "moco_tf.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["moco_tf.models.resnet"] = stub
    import torch
    import torch.nn.functional as F

    ref = import_module("tests.support.torch_reference")
    assert "tensorflow" not in sys.modules
    report("imports")
    torch.manual_seed(0)
    depth, feature_dim = int(args.arch.removeprefix("resnet")), stub.feature_dim(args.arch)
    encoder_q, encoder_k = (ref.ResNet(depth, fc=ref.moco_head(feature_dim, 128, True)) for _ in range(2))
    encoder_k.load_state_dict(encoder_q.state_dict())  # builder.py: key encoder = copy of the query's
    for p in encoder_k.parameters():
        p.requires_grad = False
    queue = F.normalize(torch.randn(128, args.queue_size), dim=0)
    # DemoTrainer's state, built without a moco_tf model to copy from; its step() is used as is.
    trainer = object.__new__(ref.DemoTrainer)
    trainer.device = torch.device("cpu")
    trainer.moco = ref.OfficialMoCo(encoder_q, encoder_k, queue, 0.999, 0.2).train()
    trainer.optimizer = torch.optim.SGD(encoder_q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    views = views_batch(args)
    report("model")
    began = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.step(views)
    float(loss)
    report("steps", seconds_per_step=(time.perf_counter() - began) / args.steps)


def run_child(framework: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--child={framework}", f"--arch={args.arch}",
               f"--image_size={args.image_size}", f"--batch_size={args.batch_size}", f"--steps={args.steps}",
               f"--queue_size={args.queue_size}"] + (["--jit_compile"] if args.jit_compile else [])  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{framework} child failed: {done.stderr[-3000:]}")
    stages = [json.loads(line[len("STAGE "):]) for line in done.stdout.splitlines() if line.startswith("STAGE ")]
    return {s["stage"]: s for s in stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--queue_size", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--frameworks", default="moco_tf,torch")
    parser.add_argument("--child", choices=("moco_tf", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        def report(stage, **extra):
            print("STAGE " + json.dumps({"stage": stage, "peak_mib": peak_mib(), "rss_mib": current_mib(), **extra}),
                  flush=True)

        (child_moco_tf if args.child == "moco_tf" else child_torch)(args, report)
        return

    print(f"{args.arch} {args.image_size}px batch {args.batch_size}, queue {args.queue_size}, dim 128, MLP head, "
          f"{args.steps} steps; peak RSS (MiB) after imports / model / steps")  # fmt: skip
    results = {}
    for framework in args.frameworks.split(","):
        stages = results[framework] = run_child(framework, args)
        print(f"{framework:8s} " + " / ".join(f"{stages[s]['peak_mib']:.0f}" for s in ("imports", "model", "steps"))
              + f"   ({stages['steps']['seconds_per_step']:.1f} s/step)", flush=True)  # fmt: skip
    if len(results) == 2:
        ratio = results["moco_tf"]["steps"]["peak_mib"] / results["torch"]["steps"]["peak_mib"]
        print(f"moco_tf / torch peak RSS: {ratio:.2f}")


if __name__ == "__main__":
    main()
