"""One worker of the multi-worker test: trains through the CLI's code path, then dumps its state."""

import sys

import numpy as np
from absl import app, flags

from moco_tf import train
from moco_tf.flags import define_train_flags

define_train_flags()
flags.DEFINE_string("dump", None, "npz file for this worker's final queue and weights")


def main(argv):
    model = train.train_from_flags()
    state = {"queue": np.asarray(model.queue), "ptr": np.asarray(model.queue_ptr)}
    for i, weight in enumerate(model.encoder_k.weights + model.encoder_q.weights):
        state[f"w{i}"] = np.asarray(weight)
    np.savez(flags.FLAGS.dump, **state)


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
