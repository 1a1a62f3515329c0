"""Use a moco_tf TF-Hub export from Keras 2 (tf_keras + hub.KerasLayer), Keras 3 (TFSMLayer)
and plain TensorFlow.

    python export/example.py --export_dir=export/moco_v2_r50 [--image=cat.jpg] [--fine_tune]

Needs tensorflow, tensorflow-hub and tf-keras (for hub.KerasLayer), not moco_tf.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def load_images(image_path: str | None) -> np.ndarray:
    """Two images as the export expects them: float32 RGB in [0, 1], [batch, height, width, 3].

    Normalisation (ImageNet mean/std) happens inside the export. For evaluation, resize the
    shorter side to 256 and center-crop 224, as the linear protocol does; any size works.
    """
    if image_path is None:
        return np.random.RandomState(0).rand(2, 224, 224, 3).astype(np.float32)
    image = tf.io.decode_image(tf.io.read_file(image_path), channels=3, expand_animations=False)
    image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]
    height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
    scale = 256.0 / tf.minimum(height, width)
    size = tf.cast(tf.round(tf.stack([height, width]) * scale), tf.int32)
    image = tf.image.resize_with_crop_or_pad(tf.image.resize(image, size), 224, 224)
    return tf.stack([image, tf.image.flip_left_right(image)]).numpy()


def keras2_classifier(export_dir: str, num_classes: int, fine_tune: bool):
    """Keras 2: hub.KerasLayer inside a tf_keras model. trainable=True fine-tunes the encoder,
    with its BatchNorm in training mode during fit (inference mode in predict)."""
    import tensorflow_hub as hub
    import tf_keras

    encoder = hub.KerasLayer(export_dir, trainable=fine_tune, name="moco_encoder")
    return tf_keras.Sequential(
        [tf_keras.Input((None, None, 3)), encoder, tf_keras.layers.Dense(num_classes)]
    )


def keras3_features(export_dir: str):
    """Keras 3: TFSMLayer wraps the serving signature (outputs a dict). It is trainable by
    default; trainable=False freezes the encoder, as a feature extractor should be."""
    import keras

    layer = keras.layers.TFSMLayer(export_dir, call_endpoint="serving_default", trainable=False)
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, layer(inputs))


def keras3_classifier(export_dir: str, num_classes: int, fine_tune: bool):
    """Keras 3: a classifier on the export's `features` endpoint. Frozen (trainable=False), or
    fine-tuned: `features_training` runs in fit (BatchNorm batch statistics, moving statistics
    updated), `features` in predict. With an optimizer that has slots (momentum, Adam) use the
    TFSMLayer subclass of segmentation_example.py (a Keras 3.15 naming bug; export/README.md)."""
    import keras

    layer = keras.layers.TFSMLayer(
        export_dir,
        call_endpoint="features",
        call_training_endpoint="features_training" if fine_tune else None,
        trainable=fine_tune,
    )
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(layer(inputs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--image", default=None, help="an image file; random pixels when absent")
    parser.add_argument("--fine_tune", action="store_true", help="train the encoder in the Keras 2 and 3 steps")
    args = parser.parse_args()

    with open(os.path.join(args.export_dir, "assets", "moco_config.json")) as f:
        config = json.load(f)
    print("export:", {k: config.get(k) for k in ("arch", "moco_version", "epochs", "dataset")})
    x = load_images(args.image)

    # 1. Keras 2 / TF-Hub: a linear classifier on frozen features (--fine_tune: the encoder too).
    classifier = keras2_classifier(args.export_dir, num_classes=10, fine_tune=args.fine_tune)
    classifier.compile("sgd", "sparse_categorical_crossentropy")
    classifier.fit(x, np.array([3, 3]), epochs=1, verbose=0)
    print("keras 2 logits", classifier.predict(x, verbose=0).shape)

    # 2. Keras 3: frozen features, then a classifier (--fine_tune: the encoder too).
    outputs = keras3_features(args.export_dir).predict(x, verbose=0)
    for key, value in sorted(outputs.items()):
        print(f"keras 3 {key} {value.shape}")
    classifier = keras3_classifier(args.export_dir, num_classes=10, fine_tune=args.fine_tune)
    classifier.compile("sgd", "sparse_categorical_crossentropy")
    classifier.fit(x, np.array([3, 3]), epochs=1, verbose=0)
    print("keras 3 logits", classifier.predict(x, verbose=0).shape)

    # 3. Plain TensorFlow: the same signature TF Serving answers.
    loaded = tf.saved_model.load(args.export_dir)
    features = loaded.signatures["serving_default"](images=tf.constant(x))["feature_vector"]
    print(f"feature_vector {tuple(features.shape)}")


if __name__ == "__main__":
    main()
