"""moco_tf: MoCo v1/v2 self-supervised pretraining in TensorFlow 2 + Keras 3."""

from moco_tf._quiet_tf_startup import import_tensorflow_quietly

# First, before any module of ours imports TensorFlow: `python -m moco_tf.X` runs this file
# before moco_tf/X.py. Keeps TensorFlow's start-up notices (and, with no GPU driver, the
# certain cuInit failure) off the screen unless TF_CPP_MIN_LOG_LEVEL is set; see the module.
import_tensorflow_quietly()

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import moco_tf.resnet` does not build the whole package.
    if name == "MoCo":
        from moco_tf.models.moco import MoCo

        return MoCo
    if name == "PretrainConfig":
        from moco_tf.training.config import PretrainConfig

        return PretrainConfig
    if name == "pretrain":
        from moco_tf.training.pretrain import pretrain

        return pretrain
    raise AttributeError(f"module 'moco_tf' has no attribute {name!r}")
