"""moco_tf: MoCo v1/v2 self-supervised pretraining in TensorFlow 2 + Keras 3.

Importing it starts nothing and changes no setting: the quiet TensorFlow start-up is the command
lines' (moco_tf.cli), and the library reports through `logging` (moco_tf.reporting).
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import moco_tf` builds nothing and imports no TensorFlow.
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
