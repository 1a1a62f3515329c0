"""moco_tf.data.augment: distributions over a few thousand draws on tiny images, and parity of the
deterministic pieces with the official pipeline.

The official pipeline is torchvision on PIL images. torchvision is not installed here, so the
references are PIL itself (grayscale, resize + centre crop) and plain torch tensor math that
reproduces torchvision's formulas (functional_tensor: _blend, _rgb2hsv/_hsv2rgb, normalize,
bilinear interpolate, RandomResizedCrop.get_params in numpy).
"""

import dataclasses
import io
import math

import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image

from moco_tf.data import augment

MEAN = np.array(augment.IMAGENET_MEAN, np.float32)
STD = np.array(augment.IMAGENET_STD, np.float32)


def _unnormalize(x):
    return np.asarray(x) * STD + MEAN


def _random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# RandomResizedCrop


def _torchvision_get_params(height, width, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params of torchvision, with numpy's generator for torch's."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_windows_match_torchvision_distribution():
    n, height, width = 4000, 120, 90
    win = augment.sample_crop_windows(tf.fill([n], height), tf.fill([n], width), augment.as_seed(1)).numpy()
    top, left, h, w = win.T
    assert (h > 0).all() and (w > 0).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    log_ratio = np.log(w / h)
    # rounding of h and w to pixels widens the ranges a little
    assert area.min() > 0.19 and area.max() <= 1.0
    assert log_ratio.min() > math.log(3 / 4) - 0.03 and log_ratio.max() < math.log(4 / 3) + 0.03

    rng = np.random.default_rng(0)
    ref = np.array([_torchvision_get_params(height, width, rng) for _ in range(n)])
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    ref_log_ratio = np.log(ref[:, 3] / ref[:, 2])
    # Same distribution: deciles of area and log ratio agree within sampling noise.
    q = np.linspace(0.1, 0.9, 9)
    np.testing.assert_allclose(np.quantile(area, q), np.quantile(ref_area, q), atol=0.03)
    np.testing.assert_allclose(np.quantile(log_ratio, q), np.quantile(ref_log_ratio, q), atol=0.03)
    # Positions uniform over the free range: mean relative offset 0.5.
    free = height - h
    assert abs(np.mean(top[free > 0] / free[free > 0]) - 0.5) < 0.03


def test_crop_windows_fallback_is_torchvision_centre_crop():
    # A 10 x 400 strip: no try can fit a ratio within [3/4, 4/3], so the fallback is taken.
    win = augment.sample_crop_windows(tf.constant([10, 400]), tf.constant([400, 10]), augment.as_seed(0)).numpy()
    rng = np.random.default_rng(0)
    assert tuple(win[0]) == _torchvision_get_params(10, 400, rng) == (0, 193, 10, 13)
    assert tuple(win[1]) == _torchvision_get_params(400, 10, rng) == (193, 0, 13, 10)


def test_crop_and_resize_matches_torch_bilinear():
    """torch's interpolate(bilinear, align_corners=False), which torchvision's resize of a tensor
    uses, on the cropped region; the flip mirrors it. One documented difference: when a crop is
    upscaled, output pixels whose sample point falls within half a source pixel outside the crop
    blend in the neighbouring source pixel where torchvision clamps to the crop's edge; those
    outer rows and columns are compared loosely, all others exactly."""
    images = _random_images(3, 20, 24)
    windows = np.array([[0, 0, 20, 24], [3, 5, 9, 12], [11, 2, 9, 22]], np.int32)
    size = 32
    flip = tf.constant([False, True, False])
    out = augment.crop_and_resize_batch(images, windows, size, flip=flip).numpy()
    for i, (t, left, h, w) in enumerate(windows):
        crop = torch.from_numpy(images[i, t : t + h, left : left + w].astype(np.float32)).permute(2, 0, 1)
        ref = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)
        ref = ref[0].permute(1, 2, 0).numpy()
        if i == 1:
            ref = ref[:, ::-1]
        k = np.arange(size) + 0.5
        rows = (k * h / size - 0.5 >= 0) & (k * h / size - 0.5 <= h - 1)
        cols = (k * w / size - 0.5 >= 0) & (k * w / size - 0.5 <= w - 1)
        inner = rows[:, None] & cols[None, :]
        assert inner.mean() > 0.75
        np.testing.assert_allclose(out[i][inner], ref[inner], atol=1e-3)
        np.testing.assert_allclose(out[i][~inner], ref[~inner], atol=255)  # shapes only
        if i == 0:  # the whole image: clamping to the crop is clamping to the image, exact
            np.testing.assert_allclose(out[i], ref, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# rates over many draws


def _ramp_images(n, size=16):
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.float32)[None, :, None], (size, 1, 3))
    return np.repeat(np.round(ramp).astype(np.uint8)[None], n, axis=0)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_flip_rate_is_half(version):
    # A left-to-right ramp stays increasing through crop, jitter (monotone per image), grayscale
    # and blur; only the flip turns it around.
    n = 3000
    views = _unnormalize(augment.augment_batch(_ramp_images(n), version, 16, seed=3))
    left, right = views[:, :, 0].mean(axis=(1, 2)), views[:, :, -1].mean(axis=(1, 2))
    assert (left != right).all()
    assert abs(np.mean(left > right) - 0.5) < 0.03


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_grayscale_rate(version):
    n = 3000
    views = _unnormalize(augment.augment_batch(_random_images(n, 8, 8), version, 8, seed=4))
    gray = np.all(np.abs(views - views[..., :1]) < 1e-5, axis=(1, 2, 3))
    assert abs(gray.mean() - 0.2) < 0.025


# The host's colour stage and the accelerator's (static shapes): the same distributions.
STATIC = pytest.mark.parametrize("static_shapes", [False, True], ids=["host", "device"])


@STATIC
def test_grayscale_stage_rate(static_shapes):
    n = 3000
    x = tf.constant(_random_images(n, 4, 4) / 255.0, tf.float32)
    out = augment.random_grayscale(x, 0.2, augment.as_seed(4), static_shapes).numpy()
    gray = np.all(np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3))
    assert abs(gray.mean() - 0.2) < 0.025
    np.testing.assert_allclose(out[gray][..., 0], augment.rgb_to_grayscale(x.numpy()[gray])[..., 0], atol=1e-6)
    np.testing.assert_array_equal(out[~gray], x.numpy()[~gray])


@STATIC
def test_jitter_rate_and_brightness_factors(static_shapes):
    n = 3000
    x = tf.constant(_random_images(n, 4, 4) / 255.0, tf.float32)
    out = augment.color_jitter(x, (0.4, 0.4, 0.4, 0.1), 0.8, augment.as_seed(5), static_shapes).numpy()
    changed = np.abs(out - x.numpy()).max(axis=(1, 2, 3)) > 1e-6
    assert abs(changed.mean() - 0.8) < 0.025
    # Brightness alone: out = clip(f * x), f ~ U[0.6, 1.4] per image.
    dark = x * 0.5
    out = augment.color_jitter(dark, (0.4, 0.0, 0.0, 0.0), 1.0, augment.as_seed(6), static_shapes).numpy()
    f = out.reshape(n, -1).sum(1) / dark.numpy().reshape(n, -1).sum(1)
    np.testing.assert_allclose(out, dark.numpy() * f[:, None, None, None], atol=1e-5)
    assert 0.6 <= f.min() < 0.62 and 1.38 < f.max() <= 1.4
    assert abs(f.mean() - 1.0) < 0.02 and abs(np.mean(f < 1.0) - 0.5) < 0.03


def test_jitter_order_is_a_uniform_random_permutation_per_image():
    n = 4800
    factors, order, applied = augment.jitter_params(n, (0.4, 0.4, 0.4, 0.1), 0.8, augment.as_seed(7))
    order = order.numpy()
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    _, counts = np.unique(order, axis=0, return_counts=True)
    assert len(counts) == 24 and counts.min() > 130 and counts.max() < 270  # 200 expected each
    f = factors.numpy()
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and np.abs(f[:, 3]).max() <= 0.1
    # strength 0 disables an op (torchvision: None)
    _, order0, _ = augment.jitter_params(8, (0.4, 0.0, 0.4, 0.0), 1.0, augment.as_seed(7))
    assert ((order0.numpy() == -1).sum(axis=1) == 2).all()


@STATIC
def test_apply_jitter_runs_each_image_in_its_order(static_shapes):
    x = tf.constant(_random_images(4, 6, 6, seed=16) / 255.0, tf.float32)
    factors = tf.constant([[1.3, 0.7, 1.4, 0.08], [0.6, 1.3, 0.5, -0.05], [1.2, 1.2, 1.2, 0.1], [1.4, 0.6, 1.4, 0.1]])
    order = tf.constant([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]], tf.int32)
    applied = tf.constant([True, True, True, False])
    out = augment.apply_jitter(x, factors, order, applied, static_shapes).numpy()
    ops = [augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation, augment.adjust_hue]
    for i in range(4):
        ref = x[i : i + 1]
        if applied[i]:
            for k in order[i].numpy():
                ref = ops[k](ref, factors[i : i + 1, k])
        np.testing.assert_allclose(out[i], ref[0], atol=1e-6)
    # the order matters here, so a shared order would fail the loop above
    reversed_order = augment.apply_jitter(x, factors, order[::-1], applied, static_shapes).numpy()
    assert np.abs(out[0] - reversed_order[0]).max() > 1e-3


@STATIC
def test_blur_rate_and_sigma(static_shapes):
    # Delta images, blurred with p=0.5, sigma ~ U[0.1, 2] (image_size 224): the centre pixel of
    # a blurred delta is below 1 - 1e-6 once sigma > ~0.19 (below that the kernel is a delta
    # to float precision); the profile's variance is sigma^2.
    n, size = 3000, 15
    delta = np.zeros((n, size, size, 3), np.float32)
    delta[:, size // 2, size // 2] = 1.0
    out = augment.random_gaussian_blur(tf.constant(delta), 0.5, 224, augment.as_seed(9), static_shapes).numpy()
    centre = out[:, size // 2, size // 2, 0]
    blurred = centre < 1 - 1e-6
    s0 = math.sqrt(0.5 / math.log(2 / 1e-6))  # sigma where the neighbours' weight reaches 1e-6
    expected = 0.5 * (2.0 - s0) / 1.9
    assert abs(blurred.mean() - expected) < 0.03
    row = out[blurred][:, size // 2, :, 0]
    row = row / row.sum(axis=1, keepdims=True)
    x = np.arange(size) - size // 2
    sigma = np.sqrt((row * x**2).sum(axis=1))
    # (the discrete profile's sigma is ~0 for sigma < 0.3, where the kernel is nearly a delta)
    assert sigma.max() < 2.0
    big = sigma[sigma > 0.5]  # U[0.5, 2] above 0.5: mean 1.25 (truncation at 3 sigma: a little less)
    assert abs(big.mean() - 1.25) < 0.06
    # Energy kept: every output is a normalised kernel.
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, atol=1e-4)


def test_blur_of_delta_is_gaussian_and_edges_replicate():
    sigmas = np.array([0.5, 1.0, 2.0], np.float32)
    delta = np.zeros((3, 21, 21, 3), np.float32)
    delta[:, 10, 10] = 1.0
    out = augment.gaussian_blur(tf.constant(delta), tf.constant(sigmas), 6).numpy()
    x = np.arange(-6, 7)
    for i, s in enumerate(sigmas):
        k = np.exp(-(x**2) / (2 * s**2))
        k /= k.sum()
        np.testing.assert_allclose(out[i, 4:17, 4:17, 1], np.outer(k, k), atol=1e-6)
    # A constant image stays constant up to the border (replicated, not zero-padded).
    const = np.full((3, 9, 9, 3), 0.7, np.float32)
    np.testing.assert_allclose(augment.gaussian_blur(const, tf.constant(sigmas), 6), const, atol=1e-6)


def test_blur_sigma_scales_with_image_size():
    assert augment.blur_radius(224) == 6
    assert augment.blur_radius(32) == 1
    n, size = 2000, 9
    delta = np.zeros((n, size, size, 3), np.float32)
    delta[:, 4, 4] = 1.0
    medians = {}
    for image_size in (224, 448):
        out = augment.random_gaussian_blur(tf.constant(delta), 1.0, image_size, augment.as_seed(10)).numpy()
        row = out[:, 4, :, 0]
        sigma = np.sqrt((row / row.sum(1, keepdims=True) * (np.arange(size) - 4) ** 2).sum(1))
        medians[image_size] = np.median(sigma)
    # U[0.1, 2] has median 1.05, U[0.2, 4] 2.1 (the 9-pixel window truncates the widest)
    assert abs(medians[224] - 1.05) < 0.1 and medians[448] > 1.8


# ----------------------------------------------------------------------------------------------
# parity of the deterministic pieces


def _torch_blend(img1, img2, ratio):
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0, 1)


def _torch_gray(img):
    r, g, b = img.unbind(dim=-3)
    w = augment.GRAY_WEIGHTS
    return (w[0] * r + w[1] * g + w[2] * b).unsqueeze(-3)


def _torch_rgb2hsv(img):  # torchvision.transforms._functional_tensor._rgb2hsv
    r, g, b = img.unbind(dim=-3)
    maxc = torch.max(img, dim=-3).values
    minc = torch.min(img, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = hr + hg + hb
    h = torch.fmod((h / 6.0 + 1.0), 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _torch_hsv2rgb(img):  # torchvision.transforms._functional_tensor._hsv2rgb
    h, s, v = img.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    i = i.to(dtype=torch.int32)
    p = torch.clamp((v * (1.0 - s)), 0.0, 1.0)
    q = torch.clamp((v * (1.0 - s * f)), 0.0, 1.0)
    t = torch.clamp((v * (1.0 - s * (1.0 - f))), 0.0, 1.0)
    i = i % 6
    mask = i.unsqueeze(dim=-3) == torch.arange(6, device=i.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(dtype=img.dtype), a4)


def _torch_adjust(name, img, f):
    if name == "brightness":
        return _torch_blend(img, torch.zeros_like(img), f)
    if name == "contrast":
        mean = torch.mean(_torch_gray(img), dim=(-3, -2, -1), keepdim=True)
        return _torch_blend(img, mean, f)
    if name == "saturation":
        return _torch_blend(img, _torch_gray(img), f)
    hsv = _torch_rgb2hsv(img)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + f) % 1.0
    return _torch_hsv2rgb(torch.stack((h, s, v), dim=-3))


@pytest.mark.parametrize(
    "name, factors",
    [
        ("brightness", [0.6, 1.0, 1.4]),
        ("contrast", [0.6, 1.0, 1.4]),
        ("saturation", [0.6, 1.0, 1.4]),
        ("hue", [-0.1, 0.0, 0.4]),
    ],
)
def test_jitter_ops_match_torchvision_formulas(name, factors):
    """torchvision's tensor formulas with PIL's luma weights (0.299; torchvision's tensor
    path uses 0.2989, the official PIL pipeline 0.299)."""
    x = _random_images(3, 12, 10, seed=11).astype(np.float32) / 255.0
    ours = getattr(augment, f"adjust_{name}")(tf.constant(x), tf.constant(factors, tf.float32)).numpy()
    for i, f in enumerate(factors):
        ref = _torch_adjust(name, torch.from_numpy(x[i]).permute(2, 0, 1), f).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours[i], ref, atol=2e-5 if name != "hue" else 1e-4)


def test_grayscale_matches_pil():
    img = _random_images(1, 16, 16, seed=12)[0]
    ref = np.asarray(Image.fromarray(img).convert("L"), np.float32)
    ours = augment.rgb_to_grayscale(tf.constant(img, tf.float32)).numpy()[..., 0]
    assert np.abs(ours - ref).max() <= 0.5 + 1e-3  # PIL rounds to uint8


def test_normalize_matches_torchvision():
    x = np.random.default_rng(13).random((2, 5, 5, 3), dtype=np.float32)
    ref = (torch.from_numpy(x) - torch.tensor(augment.IMAGENET_MEAN)) / torch.tensor(augment.IMAGENET_STD)
    np.testing.assert_allclose(augment.normalize(x), ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(augment.normalize(np.broadcast_to(MEAN, (1, 2, 2, 3))), 0.0, atol=1e-6)
    np.testing.assert_allclose(augment.normalize(np.broadcast_to(MEAN + STD, (1, 2, 2, 3))), 1.0, atol=1e-6)


@pytest.mark.parametrize("shape, size", [((300, 400), 224), ((375, 250), 224), ((32, 32), 32), ((40, 70), 32)])
def test_eval_transform_matches_pil_resize_centre_crop(shape, size):
    """Resize(size * 256 / 224) + CenterCrop(size) as torchvision does on a PIL image."""
    rng = np.random.default_rng(14)
    # smooth content (resampling filters differ most on noise)
    small = rng.integers(0, 256, (shape[0] // 4 + 1, shape[1] // 4 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.BICUBIC))
    target = augment.eval_resize_size(size)
    h, w = shape
    new = (target, int(target * w / h)) if h <= w else (int(target * h / w), target)
    pil = np.asarray(Image.fromarray(img).resize((new[1], new[0]), Image.BILINEAR), np.float32)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    ref = pil[top : top + size, left : left + size]
    ours = _unnormalize(augment.eval_transform(tf.constant(img), size)) * 255.0
    assert ours.shape == (size, size, 3)
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.6 and diff.max() <= 3.0


# ----------------------------------------------------------------------------------------------
# whole views


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_augment_batch_shapes_and_determinism(version):
    images = _random_images(6, 20, 28)
    a = augment.augment_batch(images, version, 24, seed=1)
    b = augment.augment_batch(images, version, 24, seed=tf.constant([1, 0]))
    c = augment.augment_batch(images, version, 24, seed=2)
    assert a.shape == (6, 24, 24, 3) and a.dtype == tf.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    un = _unnormalize(a)
    assert un.min() >= -1e-5 and un.max() <= 1 + 1e-5


def test_augment_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.augment_batch(_random_images(1, 8, 8), "v3", 8)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        augment.augment_batch(np.zeros((8, 8, 3), np.uint8), "v2", 8)


def _jpeg(img, quality=95):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_random_crops_encoded_decodes_only_the_window():
    img = np.asarray(Image.fromarray(_random_images(1, 12, 16)[0]).resize((64, 48), Image.BICUBIC))
    encoded = tf.constant(_jpeg(img))
    seed = augment.as_seed(15)
    views = augment.random_crops_encoded(encoded, 20, 2, seed, flip=False).numpy()
    assert views.shape == (2, 20, 20, 3) and views.dtype == np.uint8
    # Same windows, drawn the same way, cropped from the fully decoded image.
    s_win, _ = augment.split_seed(seed, 2)
    windows = augment.sample_crop_windows(tf.fill([2], 48), tf.fill([2], 64), s_win).numpy()
    full = tf.io.decode_jpeg(encoded, channels=3)
    for v, (t, left, h, w) in enumerate(windows):
        crop = full[t : t + h, left : left + w]
        ref = augment.resize_uint8(crop, 20, 20).numpy()
        # libjpeg's windowed decode upsamples the chroma of the window's last column (row) from
        # the window alone: up to ~25 levels there on this noise, a level or two elsewhere.
        diff = np.abs(views[v].astype(int) - ref)
        assert diff[:-2, :-2].max() <= 2 and diff.mean() < 1.0
    np.testing.assert_array_equal(views, augment.random_crops_encoded(encoded, 20, 2, seed, flip=False))
    # PNG goes the decode-then-crop way with the same windows.
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    png_views = augment.random_crops_encoded(tf.constant(buf.getvalue()), 20, 2, seed, flip=False).numpy()
    for v, (t, left, h, w) in enumerate(windows):
        ref = augment.resize_uint8(img[t : t + h, left : left + w], 20, 20).numpy()
        np.testing.assert_array_equal(png_views[v], ref)


def test_random_crops_encoded_flip_rate():
    ramp = np.round(np.tile(np.linspace(0, 255, 64)[None, :, None], (48, 1, 3))).astype(np.uint8)
    encoded = tf.constant(_jpeg(ramp))
    fn = tf.function(lambda s: augment.random_crops_encoded(encoded, 8, 2, s))
    views = np.concatenate([fn(tf.constant([i, 1], tf.int64)).numpy() for i in range(300)]).astype(int)
    flipped = views[:, :, 0].mean(axis=(1, 2)) > views[:, :, -1].mean(axis=(1, 2))
    assert abs(flipped.mean() - 0.5) < 0.07


@pytest.mark.parametrize("side", [150, 300, 448, 700])
def test_resize_matches_pil_bilinear(side):
    """The crop's resize against PIL's (the official pipeline's): plain bilinear up to a 2x
    shrink, antialiased beyond; on smooth content they differ by 1.5 levels on average at most."""
    rng = np.random.default_rng(17)
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC))
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), np.float32)
    diff = np.abs(augment.resize_uint8(tf.constant(img), 224, 224).numpy() - ref)
    assert diff.mean() < 1.5 and np.quantile(diff, 0.99) <= 6


def test_blur_with_no_image_chosen(monkeypatch):
    """With oneDNN (TF's default, off in these tests for bit-stable references) a depthwise conv
    over zero images fails ("filter must not have zero elements"), which small batches hit."""
    real_blur = augment.gaussian_blur

    def checked_blur(images, sigmas, radius):
        assert images.shape[0] > 0, "blur called on an empty batch"
        return real_blur(images, sigmas, radius)

    monkeypatch.setattr(augment, "gaussian_blur", checked_blur)
    x = tf.constant(_random_images(3, 6, 6) / 255.0, tf.float32)
    np.testing.assert_array_equal(augment.random_gaussian_blur(x, 0.0, 224, augment.as_seed(0)), x)
    assert np.abs(augment.random_gaussian_blur(x, 1.0, 224, augment.as_seed(0)) - x).max() > 0


@STATIC
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tiny_batches(version, static_shapes):
    fn = tf.function(lambda s: augment.augment_batch(_random_images(1, 12, 12), version, 12, s))
    for i in range(16):
        assert np.isfinite(fn(tf.constant([i, 0], tf.int64)).numpy()).all()
    x = tf.constant(_random_images(3, 6, 6) / 255.0, tf.float32)
    np.testing.assert_array_equal(augment.random_grayscale(x, 0.0, augment.as_seed(0), static_shapes), x)
    np.testing.assert_array_equal(
        augment.color_jitter(x, (0.4, 0.4, 0.4, 0.1), 0.0, augment.as_seed(0), static_shapes), x
    )
    views = tf.function(lambda s: augment.color_views(x, version, 6, s, static_shapes=static_shapes))
    for i in range(8):
        assert np.isfinite(views(tf.constant([i, 0], tf.int64)).numpy()).all()


# ----------------------------------------------------------------------------------------------
# ViewOptions: crop scale, flip, blur (departures for tiny images), and the pipeline's image ids


def test_view_options_validation_and_defaults():
    assert augment.ViewOptions() == augment.OFFICIAL_VIEWS
    assert augment.OFFICIAL_VIEWS.crop_scale == augment.PRETRAIN_CROP_SCALE
    assert augment.ViewOptions(crop_min_scale=0.5).crop_scale == (0.5, 1.0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="crop_min_scale"):
            augment.ViewOptions(crop_min_scale=bad)


def test_crop_min_scale_draws_areas_as_torchvision_does():
    """RandomResizedCrop(scale=(0.5, 1)): areas above 0.5 (less pixel rounding), and the deciles
    of area of torchvision's draws (large areas with a ratio far from 1 overflow and are drawn again)."""
    n, side = 4000, 64
    scale = augment.ViewOptions(crop_min_scale=0.5).crop_scale
    win = augment.sample_crop_windows(tf.fill([n], side), tf.fill([n], side), augment.as_seed(21), scale=scale).numpy()
    area = win[:, 2] * win[:, 3] / side**2
    assert area.min() > 0.48
    rng = np.random.default_rng(1)
    ref = np.array([_torchvision_get_params(side, side, rng, scale=scale) for _ in range(n)])
    ref_area = ref[:, 2] * ref[:, 3] / side**2
    q = np.linspace(0.1, 0.9, 9)
    np.testing.assert_allclose(np.quantile(area, q), np.quantile(ref_area, q), atol=0.02)
    # and not the official 0.2's
    assert np.quantile(area, 0.1) > augment.PRETRAIN_CROP_SCALE[0] + 0.3


def test_no_flip_keeps_every_ramp_increasing():
    options = augment.ViewOptions(flip=False)
    views = _unnormalize(augment.augment_batch(_ramp_images(500), "v2", 16, seed=3, options=options))
    assert (views[:, :, 0].mean(axis=(1, 2)) < views[:, :, -1].mean(axis=(1, 2))).all()


def test_whole_image_views_without_flip_or_blur_by_hand():
    """crop_min_scale=1 on a square image: every draw of area 1 with a ratio != 1 overflows, so
    the crop is the whole image (torchvision's fallback), resized S -> S (the identity); then only
    the colour ops, without blur: exactly color_views(image) with the seed's third part."""
    images = _random_images(6, 24, 24, seed=22)
    options = augment.ViewOptions(crop_min_scale=1.0, flip=False, blur=False)
    views = augment.augment_batch(images, "v2", 24, seed=5, options=options).numpy()
    _, _, s_color = augment.split_seed(augment.as_seed(5), 3)
    expected = augment.color_views(images / 255.0, "v2", 24, s_color, blur=False).numpy()
    np.testing.assert_allclose(views, expected, atol=1e-5)


def test_no_blur_never_calls_the_blur(monkeypatch):
    calls = []
    real_blur = augment.random_gaussian_blur
    monkeypatch.setattr(augment, "random_gaussian_blur", lambda *args: calls.append(1) or real_blur(*args))
    crops = _random_images(4, 16, 16)
    augment.augment_crops(crops, "v2", 16, seed=1, options=augment.ViewOptions(blur=False))
    assert calls == []
    augment.augment_crops(crops, "v2", 16, seed=1)
    assert calls == [1]


def test_pretrain_ids_name_the_images_shown():
    """The ids of an epoch are a permutation of the split, and each view is a view of the image its
    id names (whole-image crops: the view's luma correlates with that image's only)."""
    from moco_tf.data import pipelines, sources

    source = sources.make_source("digits")
    images, labels = source.splits["train"]
    source = dataclasses.replace(source, splits={"train": (images[:24], labels[:24])})
    options = augment.ViewOptions(crop_min_scale=1.0, flip=False, blur=False)
    ds = pipelines.pretrain_dataset(source, "train", 32, "v1", 8, seed=3, views=options)
    batches = list(ds.take(3))
    ids = np.concatenate([b["ids"].numpy() for b in batches])
    assert sorted(ids.tolist()) == list(range(24))
    gray = images[:24, :, :, 0].reshape(24, -1).astype(np.float64)
    views = np.concatenate([_unnormalize(b["views"]) for b in batches])  # [24, 2, 32, 32, 3]
    for view in (0, 1):
        luma = views[:, view].mean(axis=-1).reshape(24, -1)
        corr = np.corrcoef(luma, gray)[:24, 24:]  # [view, image]
        np.testing.assert_array_equal(corr.argmax(axis=1), ids)
