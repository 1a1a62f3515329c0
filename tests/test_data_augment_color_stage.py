"""The colour stage on the accelerator (`--color_stage=device`): the host only crops, the train step
colours (the model's own `augment.ColorStage`, `MoCo(color_in_step=True)`), and the views are the
host's views: same draws, equal to float rounding, with and without XLA, for decoded arrays and for
encoded files, and the same training steps."""

import numpy as np
import pytest
import tensorflow as tf

import moco_tf
from moco_tf.data import augment, pipelines, sources
from moco_tf.models.backbones import BackboneSpec
from moco_tf.models.moco import MoCo
from moco_tf.training.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, RuntimeConfig
from moco_tf.training.optimizers import SGD

# float32 ops in another order (XLA fuses, partitions reorder reductions); the views are
# normalised, so 1e-4 is ~2e-5 of a [0, 1] pixel, far below one uint8 step (4e-3).
ATOL = 1e-4


def _images(n, size, seed=0):
    # Smooth colour fields: hue, saturation and contrast all change them (noise would average out).
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 1, (n, 1, 1, 3)) * 0.6 + 0.2
    slope = rng.uniform(-0.3, 0.3, (n, 1, 1, 3))
    return np.clip((base + slope * (x + y)[None, :, :, None]) * 255, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_colour_stage_static_shapes_equals_host_eager_and_under_xla(version):
    x = tf.constant(_images(48, 24) / 255.0, tf.float32)
    seed = augment.as_seed(11)
    host = augment.color_views(x, version, 24, seed).numpy()
    device = augment.color_views(x, version, 24, seed, static_shapes=True).numpy()
    compiled = tf.function(
        lambda images: augment.color_views(images, version, 24, seed, static_shapes=True), jit_compile=True
    )(x).numpy()
    np.testing.assert_allclose(device, host, atol=ATOL)
    np.testing.assert_allclose(compiled, host, atol=ATOL)
    # Not a vacuous match: the views differ from the plain normalised crops in most images.
    plain = augment.normalize(x).numpy()
    assert np.mean(np.abs(host - plain).max(axis=(1, 2, 3)) > 0.05) > 0.5


def test_batched_hue_is_the_fused_kernel():
    x = tf.constant(_images(6, 10, seed=3) / 255.0, tf.float32)
    factors = tf.constant([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5])
    np.testing.assert_allclose(augment.adjust_hue_batched(x, factors), augment.adjust_hue(x, factors), atol=2e-6)


@pytest.mark.parametrize("seed_rank", [1, 2])
def test_views_from_crops_both_seed_forms(seed_rank):
    """[2]: one draw over the 2N crops (files); [2, 2]: a draw per view (decoded arrays)."""
    crops = tf.constant(_images(16, 16, seed=5).reshape(8, 2, 16, 16, 3))
    seed = augment.as_seed(4) if seed_rank == 1 else tf.constant([[4, 0], [9, 2]], tf.int64)
    host = augment.views_from_crops(crops, seed, "v2", 16)
    device = tf.function(
        lambda c, s: augment.views_from_crops(c, s, "v2", 16, static_shapes=True), jit_compile=True
    )(crops, seed)
    assert host.shape == device.shape == (8, 2, 16, 16, 3)
    np.testing.assert_allclose(device, host, atol=ATOL)
    if seed_rank == 1:  # image-major order: view v of image i is crop 2i + v of the flat batch
        flat = augment.color_views(tf.reshape(tf.cast(crops, tf.float32), [16, 16, 16, 3]) / 255.0, "v2", 16, seed)
        np.testing.assert_allclose(host, tf.reshape(flat, [8, 2, 16, 16, 3]), atol=1e-6)


def _jpeg_folder(root, n=24, size=20):
    for i, image in enumerate(_images(n, size, seed=8)):
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=95).numpy())


@pytest.mark.parametrize("kind", ["arrays", "files"])
def test_pipeline_crops_then_step_colour_equals_host_views(kind, tmp_path):
    if kind == "arrays":
        source, size = sources.make_source("digits"), 16
    else:
        _jpeg_folder(tmp_path)
        source, size = sources.make_source("folder", data_dir=str(tmp_path)), 16
    options = augment.ViewOptions(crop_min_scale=0.5)
    common = dict(source=source, split=source.pretrain_split, image_size=size, aug="v2", global_batch_size=8,
                  seed=3, start_step=1, views=options)
    host = list(pipelines.pretrain_dataset(**common).take(2))
    crops = list(pipelines.pretrain_dataset(**common, color_in_step=True).take(2))
    color_stage = augment.ColorStage("v2", size, options.blur)  # what MoCo(color_in_step=True) runs
    for h, c in zip(host, crops, strict=True):
        assert set(c) == set(h)  # one batch type either way
        assert c["views"].dtype == tf.uint8 and c["views"].shape == (8, 2, size, size, 3)
        np.testing.assert_array_equal(c["ids"], h["ids"])
        np.testing.assert_array_equal(c["color_seed"], h["color_seed"])
        views = color_stage(c["views"], c["color_seed"])
        np.testing.assert_allclose(views, h["views"], atol=ATOL)


def _tiny(model_dir, color_stage, jit_compile=False, strategy="default"):
    return PretrainConfig(
        model=ModelConfig(BackboneSpec("resnet18", width=8, cifar_stem=True), dim=16, queue_size=64,
                          moco_momentum=0.99, temperature=0.2, mlp=True, bn_groups=2),
        data=DataConfig(dataset="digits", aug="v2", image_size=16),
        optim=OptimConfig(epochs=1, batch_size=32, lr=0.06),
        runtime=RuntimeConfig(seed=1, model_dir=model_dir, steps_per_epoch=3, knn_every=0,
                              color_stage=color_stage, jit_compile=jit_compile, strategy=strategy),
    )


def test_training_with_the_colour_stage_in_the_step(tmp_path):
    """Three steps with the colour stage in the step train as the host's (its XLA form equals the
    eager one: test_colour_stage_static_shapes_equals_host_eager_and_under_xla); auto keeps it on
    the host of a CPU-only machine."""
    runs = {}
    for name, stage, jit in (("host", "auto", False), ("device", "device", False)):
        model, history = moco_tf.pretrain(_tiny(str(tmp_path / name), stage, jit), progress="none")
        assert model.color_in_step == (model.color_stage is not None) == (stage == "device")
        runs[name] = (history["loss"][0], model.encoder_q.weights[0].numpy(), model.queue.numpy())
    loss, weights, queue = runs["host"]
    for name in ("device",):
        assert abs(runs[name][0] - loss) < 1e-4 * abs(loss), name
        np.testing.assert_allclose(runs[name][1], weights, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(runs[name][2], queue, atol=1e-3, err_msg=name)


def test_colour_stage_in_the_step_of_each_mirrored_replica(tmp_path):
    """2 replicas (logical CPUs): each colours its own crops with its own batch's seed, as the
    host pipeline would have."""
    runs = {}
    for stage in ("host", "device"):
        model, history = moco_tf.pretrain(_tiny(str(tmp_path / stage), stage, strategy="mirrored"), progress="none")
        assert model.distribute_strategy.num_replicas_in_sync == 2
        runs[stage] = (history["loss"][0], model.queue.numpy())
    assert abs(runs["device"][0] - runs["host"][0]) < 1e-4 * abs(runs["host"][0])
    np.testing.assert_allclose(runs["device"][1], runs["host"][1], atol=1e-3)


def test_crops_without_a_colour_stage_are_refused():
    model = MoCo(arch="resnet18", width=8, cifar_stem=True, dim=8, queue_size=16, image_size=16)
    model.compile(optimizer=SGD(0.1))
    crops = tf.zeros([8, 2, 16, 16, 3], tf.uint8)
    with pytest.raises(ValueError, match="color_in_step=True"):
        model.train_on_batch({"views": crops, "color_seed": tf.constant([1, 2], tf.int64), "ids": tf.range(8)})


def test_views_with_a_colour_stage_are_refused():
    model = MoCo(arch="resnet18", width=8, cifar_stem=True, dim=8, queue_size=16, image_size=16, aug="v2",
                 color_in_step=True)  # fmt: skip
    model.compile(optimizer=SGD(0.1))
    views = tf.zeros([8, 2, 16, 16, 3], tf.float32)
    with pytest.raises(ValueError, match="color_in_step=False"):
        model.train_on_batch({"views": views, "color_seed": tf.constant([1, 2], tf.int64), "ids": tf.range(8)})
    with pytest.raises(ValueError, match="needs image_size"):
        MoCo(arch="resnet18", width=8, cifar_stem=True, dim=8, queue_size=16, color_in_step=True)


def test_the_colour_stage_is_part_of_the_model_config():
    model = MoCo(arch="resnet18", width=8, cifar_stem=True, dim=8, queue_size=16, image_size=16, aug="v2",
                 blur=False, color_in_step=True)  # fmt: skip
    config = model.get_config()
    assert (config["aug"], config["blur"], config["color_in_step"]) == ("v2", False, True)
    again = MoCo.from_config(config)
    stage = again.color_stage
    assert (stage.version, stage.image_size, stage.blur) == ("v2", 16, False)
    assert not hasattr(again, "views_from_crops")  # nothing to set from outside
