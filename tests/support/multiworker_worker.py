"""One worker of the multi-worker tests: trains through the CLI's code path, then dumps its state.

--kill_at_step=N makes this worker SIGKILL itself once step N and its callbacks (checkpoint
included) are done, mid-run, as a preempted or crashed host would vanish: no handler runs.
A peer lost mid-run ends in one `error:` line (distribute.peer_failures), as in the CLI.
"""

import os
import signal
import sys

import keras
import numpy as np
from absl import flags

from moco_tf import cli, train
from moco_tf.cli.flags import define_train_flags
from moco_tf.training import distribute

define_train_flags()
flags.DEFINE_string("dump", None, "npz file for this worker's final queue and weights")
flags.DEFINE_integer("kill_at_step", None, "SIGKILL this worker right after this step's callbacks")


def _kill_after(step: int) -> None:
    # Patched on Keras' CallbackList, not on a moco_tf callback, so it follows any change of the run's callbacks.
    original = keras.callbacks.CallbackList.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        original(self, batch, logs)
        if int(self.model.optimizer.iterations.numpy()) >= step:
            print(f"killing myself after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    keras.callbacks.CallbackList.on_train_batch_end = on_train_batch_end


def main(argv):
    if flags.FLAGS.kill_at_step is not None:
        _kill_after(flags.FLAGS.kill_at_step)
    with distribute.peer_failures():
        model = train.train_from_flags()
    if flags.FLAGS.dump:
        state = {"queue": np.asarray(model.queue), "ptr": np.asarray(model.queue_ptr),
                 "step": np.asarray(model.optimizer.iterations)}
        for i, weight in enumerate(model.encoder_k.weights + model.encoder_q.weights):
            state[f"w{i}"] = np.asarray(weight)
        np.savez(flags.FLAGS.dump, **state)


if __name__ == "__main__":
    cli.run(main, user_errors=train.USER_ERRORS, argv=sys.argv)
