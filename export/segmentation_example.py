"""Dense prediction on a moco_tf export in Keras 3: an FPN-style segmentation head on the
`feature_maps` endpoint, trained for a few steps on a synthetic task (no download).

    python export/segmentation_example.py --export_dir=export/moco_v2_r50 [--steps=20] [--fine_tune]

The encoder is a `keras.layers.TFSMLayer` over the export's `feature_maps` (each ResNet stage's
output: strides 4, 8, 16, 32, or 1, 2, 4, 8 with the CIFAR stem). Frozen by default; with
--fine_tune it trains too, its BatchNorm in training mode inside `fit` (`feature_maps_training`)
and in inference mode in `predict`. The head: a 1x1 lateral conv per stage, top-down 2x upsampling
and addition (Lin et al., Feature Pyramid Networks, 2017), a 3x3 conv, per-pixel logits upsampled
to the input size. The task: coloured squares on noise, each pixel labelled with its square's
colour (0: background). This shows the plumbing works; it measures nothing about transfer quality.
Needs tensorflow and keras, not moco_tf.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

COLOURS = np.array([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]], np.float32)  # classes 1, 2, 3


class TFSMLayer(keras.layers.TFSMLayer):
    """`keras.layers.TFSMLayer` whose weights every optimizer can train. Keras 3's TFSMLayer (3.15.1
    here) names its weights after the SavedModel's variables ("conv1_kernel:0"), and an optimizer
    with slots (SGD with momentum, Adam) then fails in `fit`: "'encoder_conv1_kernel:0_momentum'
    is not a valid scope name". The same variables, named without the ':'."""

    def _add_existing_weight(self, weight):
        name = weight.name.replace("/", "_").replace(":", "_")
        variable = keras.Variable(weight, trainable=weight.trainable, dtype=weight.dtype, shape=weight.shape, name=name)
        self._track_variable(variable)


def synthetic_batch(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images float32 [n, size, size, 3] in [0, 1] (the export's input) and masks int32 [n, size, size]."""
    rng = np.random.RandomState(seed)
    images = rng.uniform(0.0, 0.3, (n, size, size, 3)).astype(np.float32)
    masks = np.zeros((n, size, size), np.int32)
    for i in range(n):
        for _ in range(2):
            cls = rng.randint(1, len(COLOURS) + 1)
            side = rng.randint(size // 4, size // 2 + 1)
            y, x = rng.randint(0, size - side + 1, 2)
            images[i, y : y + side, x : x + side] = COLOURS[cls - 1]
            masks[i, y : y + side, x : x + side] = cls
    return images, masks


def build(export_dir: str, image_size: int, num_classes: int, fine_tune: bool, channels: int = 32) -> keras.Model:
    """images [b, S, S, 3] in [0, 1] -> per-pixel logits [b, S, S, num_classes]."""
    with open(os.path.join(export_dir, "assets", "moco_config.json")) as f:
        config = json.load(f)
    stages = config["signatures"]["feature_maps"]  # ["layer1", ..., "layer4"]
    encoder = TFSMLayer(
        export_dir,
        call_endpoint="feature_maps",
        call_training_endpoint="feature_maps_training" if fine_tune else None,
        trainable=fine_tune,
        name="encoder",
    )
    inputs = keras.Input((image_size, image_size, 3))
    maps = encoder(inputs)
    # Top-down pathway: from the coarsest stage, upsample 2x and add the next stage's lateral.
    x = None
    for name in reversed(stages):
        lateral = keras.layers.Conv2D(channels, 1, name=f"lateral_{name}")(maps[name])
        x = lateral if x is None else keras.layers.Add()([keras.layers.UpSampling2D(2)(x), lateral])
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="smooth")(x)
    logits = keras.layers.Conv2D(num_classes, 1, name="classifier")(x)
    stride = 1 if config.get("cifar_stem") else 4  # layer1's stride
    if stride > 1:
        logits = keras.layers.UpSampling2D(stride, interpolation="bilinear")(logits)
    return keras.Model(inputs, logits)


def train(
    export_dir: str, steps: int = 20, image_size: int = 64, fine_tune: bool = False, batch: int = 8
) -> dict[str, float]:
    """Train the head (and with fine_tune the encoder) for `steps` steps on synthetic batches; the
    first and last step's training loss, the loss and pixel accuracy on a held-out batch before
    and after (BN in inference mode), and how many encoder weights moved."""
    keras.utils.set_random_seed(0)
    num_classes = len(COLOURS) + 1
    model = build(export_dir, image_size, num_classes, fine_tune)
    model.compile(
        keras.optimizers.Adam(1e-3 if fine_tune else 1e-2),  # a pretrained encoder takes smaller steps
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="pixel_accuracy")],
    )
    held_out = synthetic_batch(batch, image_size, seed=10_000)
    before = model.evaluate(*held_out, verbose=0, return_dict=True)
    encoder = model.get_layer("encoder")
    encoder_before = [np.array(w) for w in encoder.weights]
    images, masks = synthetic_batch(batch * steps, image_size, seed=0)
    # One step per "epoch", so the history holds every step's training loss.
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(batch)
    history = model.fit(dataset, epochs=steps, steps_per_epoch=1, verbose=0, shuffle=False).history["loss"]
    after = model.evaluate(*held_out, verbose=0, return_dict=True)
    moved = sum(not np.array_equal(b, np.array(w)) for b, w in zip(encoder_before, encoder.weights, strict=True))
    return {
        "encoder_weights": len(encoder.weights), "encoder_weights_changed": moved,
        "train_loss_first_step": history[0], "train_loss_last_step": history[-1],
        "loss_before": before["loss"], "loss_after": after["loss"],
        "pixel_accuracy_before": before["pixel_accuracy"], "pixel_accuracy_after": after["pixel_accuracy"],
        "output_shape": tuple(model.output.shape), "trainable_weights": len(model.trainable_weights),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--fine_tune", action="store_true", help="train the encoder too (BN in training mode)")
    args = parser.parse_args()
    result = train(args.export_dir, args.steps, args.image_size, args.fine_tune)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
