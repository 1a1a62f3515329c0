"""Where a MoCo train step's time goes: the whole step against its pieces, each timed alone.

    python benchmarks/step_breakdown.py --cifar_stem --width=16 --batch_size=256
    python benchmarks/step_breakdown.py --arch=resnet50 --image_size=224 --batch_size=32 --bn_groups=1 --mlp

Pieces (each a tf.function of the model's own code, on the step's shapes, best of --rounds):
- key encoder forward (training mode, as the step runs it; includes the shuffle-BN gathers);
- query encoder forward + backward (the gradient of the InfoNCE loss);
- the optimizer's update (SGD momentum + weight decay);
- the momentum (EMA) update of the key encoder, as the step runs it: one assign per variable;
- the same EMA compiled by XLA (what one fused op over all variables would cost);
- the queue: self-negative check, enqueue of keys and ids;
- InfoNCE alone (logits against the queue, cross-entropy).
The rest of the step (not listed) is Keras's fit loop and metric updates. Plus, the TF profiler's
trace of --trace_steps steps is written to --trace_dir for TensorBoard's profile tab.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from step_time import add_model_args  # noqa: E402

from moco_tf.models.losses import info_nce  # noqa: E402
from moco_tf.models.moco import MoCo, self_negative_rate  # noqa: E402
from moco_tf.training.optimizers import SGD  # noqa: E402


def best_time(fn, rounds: int, repeat: int) -> float:
    fn()  # trace and warm up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            out = fn()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--trace_dir", default=None, help="write a TF profiler trace of a few fit steps here")
    parser.add_argument("--trace_steps", type=int, default=3)
    args = parser.parse_args()

    model = MoCo(args.arch, queue_size=args.queue_size, moco_momentum=0.99, temperature=0.1, mlp=args.mlp,
                 width=args.width, cifar_stem=args.cifar_stem, bn_groups=args.bn_groups,
                 image_size=args.image_size)  # fmt: skip
    optimizer = SGD(0.06, momentum=0.9, weight_decay=5e-4)
    model.compile(optimizer=optimizer)
    n, s = args.batch_size, args.image_size
    views = tf.constant(np.random.RandomState(0).randn(n, 2, s, s, 3).astype("float32"))
    ids = tf.range(n, dtype=tf.int32)
    data = tf.data.Dataset.from_tensors({"views": views, "ids": ids}).repeat()

    def fit(steps):
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)

    fit(2)
    whole = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        fit(args.repeat)
        whole = min(whole, (time.perf_counter() - start) / args.repeat)

    x_q, x_k = views[:, 0], views[:, 1]
    variables = model.encoder_q.trainable_variables

    @tf.function
    def key_forward():
        return model._shuffled_keys(x_k, 0)[0]

    keys = key_forward()

    @tf.function
    def query_forward_backward():
        with tf.GradientTape() as tape:
            q = tf.math.l2_normalize(model.encoder_q(x_q, training=True), axis=1)
            loss, _, _ = info_nce(q, keys, model.queue, model.temperature)
        return tape.gradient(loss, variables)

    grads = query_forward_backward()

    @tf.function
    def optimizer_update():
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return optimizer.iterations

    ema = tf.function(lambda: model._momentum_update_key_encoder() or tf.constant(0))
    ema_xla = tf.function(lambda: model._momentum_update_key_encoder() or tf.constant(0), jit_compile=True)

    @tf.function
    def queue_update():
        rate = self_negative_rate(ids, model.queue_ids)
        model._dequeue_and_enqueue(keys, ids)
        return rate

    q = tf.math.l2_normalize(model.encoder_q(x_q, training=False), axis=1)
    nce = tf.function(lambda: info_nce(q, keys, model.queue, model.temperature)[0])

    pieces = {
        "key encoder forward (+ shuffle BN)": key_forward,
        "query forward + backward": query_forward_backward,
        "optimizer update": optimizer_update,
        "EMA of the key encoder (as run)": ema,
        "EMA compiled by XLA (fused)": ema_xla,
        "queue: self_neg + enqueue": queue_update,
        "InfoNCE alone": nce,
    }
    name = f"{args.arch} width {args.width} {s}x{s} batch {n}, {len(model.encoder_k.weights)} key-encoder variables"
    print(f"{name}\n  whole step (fit): {whole * 1000:8.1f} ms")
    for label, fn in pieces.items():
        t = best_time(fn, args.rounds, args.repeat)
        print(f"  {label:36s} {t * 1000:8.1f} ms  {100 * t / whole:5.1f}% of the step")

    if args.trace_dir:
        tf.profiler.experimental.start(args.trace_dir)
        fit(args.trace_steps)
        tf.profiler.experimental.stop()
        print(f"profiler trace of {args.trace_steps} steps in {args.trace_dir} (TensorBoard, profile tab)")


if __name__ == "__main__":
    main()
