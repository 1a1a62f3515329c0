"""moco_tf: MoCo v1/v2 self-supervised pretraining in TensorFlow 2 + Keras 3."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import moco_tf.resnet` does not build the whole package.
    if name == "MoCo":
        from moco_tf.model import MoCo

        return MoCo
    raise AttributeError(f"module 'moco_tf' has no attribute {name!r}")
