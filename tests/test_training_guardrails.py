"""moco_tf.training.guardrails: the small-data warnings, with the numbers of the digits quickstart."""

import dataclasses

from moco_tf.training.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, RuntimeConfig
from moco_tf.training.guardrails import recipe_warnings

DIGITS_TRAIN = 1438  # the embedded digits' pretraining split


def _config(queue=1024, batch=128, epochs=5, symmetric=False, aug="v2", blur=True, flip=True, size=32,
            dataset="digits", max_steps=None):
    return PretrainConfig(
        model=ModelConfig(queue_size=queue, symmetric=symmetric),
        data=DataConfig(dataset=dataset, image_size=size, aug=aug, blur=blur, flip=flip),
        optim=OptimConfig(epochs=epochs, batch_size=batch),
        runtime=RuntimeConfig(max_steps=max_steps),
    )


def _one(warnings, flag):
    found = [w for w in warnings if w.startswith(flag)]
    assert len(found) == 1, warnings
    return found[0]


def test_old_quickstart_recipe_gets_its_three_warnings():
    """Queue 1024 of 1438 images (71%): the largest multiple of 128 keys under 25% (359) is 256;
    blur at 32 px has sigma <= 2 * 32 / 224 = 0.29 px; digits are flipped. 11 steps an epoch and
    a queue filled after 8 of 55 steps pass."""
    warnings = recipe_warnings(_config(), DIGITS_TRAIN)
    assert len(warnings) == 3, warnings
    queue = _one(warnings, "--queue_size=1024")
    assert "71% of the 1438" in queue and "--queue_size<=256" in queue and "self_neg" in queue
    assert "sigma at most 0.29 px" in _one(warnings, "--blur at --image_size=32") and "--noblur" in warnings[1]
    assert "--noflip" in _one(warnings, "--flip on digits")


def test_quickstart_flagfile_recipe_is_clean():
    # configs/quickstart.flags: queue 256 (17.8%), batch 64 (22 steps an epoch), no blur, no flip.
    assert recipe_warnings(_config(queue=256, batch=64, epochs=15, blur=False, flip=False), DIGITS_TRAIN) == []


def test_symmetric_counts_two_keys_per_image():
    # 256 keys a step: floor(359 / 256) * 256 = 256.
    warnings = recipe_warnings(_config(queue=512, batch=128, symmetric=True, blur=False, flip=False), DIGITS_TRAIN)
    assert "--queue_size<=256 (a multiple of the 256 keys per step)" in _one(warnings, "--queue_size=512")


def test_batch_too_large_for_the_data():
    # 2 steps an epoch; no multiple of 512 fits under 25% of 1438 (359): lower the batch instead.
    warnings = recipe_warnings(_config(queue=1024, batch=512, blur=False, flip=False), DIGITS_TRAIN)
    assert len(warnings) == 2, warnings
    assert "lower --batch_size" in _one(warnings, "--queue_size=1024")
    steps = _one(warnings, "--batch_size=512")
    assert "2 steps an epoch" in steps and "--batch_size<=143" in steps  # 1438 // 10


def test_queue_that_never_fills():
    # 256 of 100,000 images is no share worth a warning, but 256 / 32 = 8 steps fill it and the run takes 3.
    config = _config(queue=256, batch=32, blur=False, flip=False, max_steps=3)
    (warning,) = recipe_warnings(config, 100_000)
    assert "takes 8 steps to fill but the run trains 3" in warning


def test_official_recipes_on_their_data():
    # MoCo v1 on ImageNet (the defaults): nothing. The CIFAR-10 demo (queue 4096 of 50,000 = 8%,
    # batch 512, 32 px, v2): only the blur, whose kernel is 3 pixels there.
    assert recipe_warnings(PretrainConfig(data=DataConfig(dataset="imagenet2012")), 1_281_167) == []
    cifar = _config(queue=4096, batch=512, epochs=200, dataset="cifar10")
    (warning,) = recipe_warnings(cifar, 50_000)
    assert warning.startswith("--blur at --image_size=32")
    # v1 has no blur, so --blur does not matter there.
    assert recipe_warnings(dataclasses.replace(cifar, data=DataConfig(dataset="cifar10", image_size=32)), 50_000) == []
