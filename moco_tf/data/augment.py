"""MoCo v1/v2 view augmentations and eval preprocessing in pure TF ops.

The distributions follow the official torchvision pipelines of facebookresearch/moco
(main_moco.py), op by op:

- v1: RandomResizedCrop(224, scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4),
  RandomHorizontalFlip, ToTensor, Normalize.
- v2: RandomResizedCrop(224, scale=(0.2, 1)), RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8),
  RandomGrayscale(0.2), RandomApply(GaussianBlur(sigma in [0.1, 2]), p=0.5), RandomHorizontalFlip,
  ToTensor, Normalize.

Everything after the crop works on whole batches with per-image random factors as vectors.
The crop has two routes: `augment_batch` crops a batch of equally sized uint8 images with one
`crop_and_resize`; `random_crops_encoded` draws the windows of one encoded file first and, for
JPEG, decodes only those windows (`decode_and_crop_jpeg`), which is what makes ImageNet fast.

The horizontal flip is folded into the crop (a box with x1 > x2 is mirrored by
`crop_and_resize`, and the per-image path flips its crop): the flip commutes with every later
op (jitter and grayscale are per pixel, the blur kernel is symmetric with replicated borders),
so the distribution is the official one.

`ViewOptions` departs from the official recipe where it does not fit the data (tiny images such as
the 8x8 digits: larger crops, no flip, no blur); its defaults are the official recipe.

Randomness is stateless: the same seed gives the same views, on any device and in any order.

The colour stage has two forms with the same random draws: the host's (`static_shapes=False`),
where each image pays only for its own ops (partitions, gathers of the chosen images), and the
accelerator's (`static_shapes=True`), where every op runs on the whole batch and a per-image
select keeps the drawn one: no data-dependent shape, so it compiles with XLA (TPU) and runs inside
the train step (`ColorStage`, a layer of the model), and the host only decodes, crops and flips.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from moco_tf.models.backbones import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (also imported from here)

# ITU-R 601-2 luma, the weights of PIL's convert("L") that the official (PIL-based) pipeline uses.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Area range of the crops: the pretraining views use MoCo's 0.2; the linear protocol
# uses torchvision's default 0.08.
PRETRAIN_CROP_SCALE = (0.2, 1.0)
LINCLS_CROP_SCALE = (0.08, 1.0)
# The official blur sigma is in pixels of a 224 image; smaller images scale it (and the kernel).
BLUR_SIGMA = (0.1, 2.0)
REFERENCE_SIZE = 224



@dataclasses.dataclass(frozen=True)
class ViewOptions:
    """Changes to the v1/v2 view recipe for data it does not fit; the defaults are the official recipe.

    crop_min_scale: smallest crop area, as a share of the image (official 0.2). A crop of 20% of
        an 8x8 digit can leave a stroke that no longer tells the class.
    flip: random horizontal flip with p=0.5 (official). Mirrored digits are other shapes.
    blur: v2's Gaussian blur (p=0.5); v1 has none, so off changes nothing there.
    """

    crop_min_scale: float = PRETRAIN_CROP_SCALE[0]
    flip: bool = True
    blur: bool = True

    def __post_init__(self):
        if not 0.0 < self.crop_min_scale <= 1.0:  # NaN fails too
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")

    @property
    def crop_scale(self) -> tuple[float, float]:
        return (self.crop_min_scale, PRETRAIN_CROP_SCALE[1])


OFFICIAL_VIEWS = ViewOptions()

VERSIONS = {
    # jitter strengths (brightness, contrast, saturation, hue), jitter probability,
    # whether grayscale comes before the jitter (v1) or after it (v2), blur probability.
    "v1": dict(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_first=True, gray_p=0.2, blur_p=0.0),
    "v2": dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_first=False, gray_p=0.2, blur_p=0.5),
}


# ----------------------------------------------------------------------------------------------
# seeds


def as_seed(seed: int | tf.Tensor | None) -> tf.Tensor:
    """A stateless seed (int64 [2]) from an int, a [2] tensor, or None (fresh random seed)."""
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int64)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.reshape(seed, [2])


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """`num` new seeds from `seed`. Made from raw Philox bits (each half in [0, 2**32)), which XLA
    draws as TF's kernels do; `stateless_split`'s full-range int64 draws differ under XLA."""
    bits = tf.random.stateless_uniform([num, 2], seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox")
    return tf.unstack(tf.cast(bits, tf.int64))


def _uniform(shape, seed, low=0.0, high=1.0) -> tf.Tensor:
    """stateless_uniform's float32 draws, made here from its raw Philox bits as TF's CPU/GPU kernel
    makes them (23 mantissa bits): XLA converts bits to floats its own way (and may choose
    another generator on TPU), which would give the accelerator's colour stage other draws."""
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox")
    unit = tf.bitcast(tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(bits, 0x7FFFFF), 0x3F800000), tf.float32) - 1.0
    if (low, high) == (0.0, 1.0):
        return unit
    return low + (high - low) * unit


def _bernoulli(n, p: float, seed) -> tf.Tensor:
    return _uniform([n], seed) < p


# ----------------------------------------------------------------------------------------------
# normalisation


def normalize(images_float01: tf.Tensor) -> tf.Tensor:
    """ToTensor-scaled images in [0, 1] -> ImageNet mean/std normalised float32."""
    x = tf.cast(images_float01, tf.float32)
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


# ----------------------------------------------------------------------------------------------
# RandomResizedCrop


def sample_crop_windows(
    heights: tf.Tensor,
    widths: tf.Tensor,
    seed: tf.Tensor,
    scale: tuple[float, float] = PRETRAIN_CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    tries: int = 10,
) -> tf.Tensor:
    """torchvision RandomResizedCrop.get_params for a batch: int32 [N, 4] (top, left, h, w).

    Per image: up to `tries` draws of area ~ U[scale] * H * W and log-uniform aspect ratio, the
    first that fits wins; if none fits, the fallback is the centred crop of the whole image
    clamped to the ratio range. Vectorised: all tries are drawn at once, the first valid kept.
    """
    heights = tf.cast(tf.reshape(heights, [-1]), tf.float32)
    widths = tf.cast(tf.reshape(widths, [-1]), tf.float32)
    n = tf.shape(heights)[0]
    s_area, s_ratio, s_pos = split_seed(seed, 3)
    area = (heights * widths)[:, None] * _uniform([n, tries], s_area, scale[0], scale[1])
    log_ratio = _uniform([n, tries], s_ratio, math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    # tf.round rounds half to even, like Python's round() in torchvision.
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    w = tf.gather(w, first, batch_dims=1)
    h = tf.gather(h, first, batch_dims=1)
    u = _uniform([n, 2], s_pos)
    # torch.randint(0, H - h + 1): floor of a uniform over the H - h + 1 positions.
    top = tf.minimum(tf.floor(u[:, 0] * (heights - h + 1)), heights - h)
    left = tf.minimum(tf.floor(u[:, 1] * (widths - w + 1)), widths - w)

    in_ratio = widths / heights
    fb_w = tf.where(in_ratio < ratio[0], widths, tf.where(in_ratio > ratio[1], tf.round(heights * ratio[1]), widths))
    fb_h = tf.where(in_ratio < ratio[0], tf.round(widths / ratio[0]), tf.where(in_ratio > ratio[1], heights, heights))
    fb_top = tf.floor((heights - fb_h) / 2)
    fb_left = tf.floor((widths - fb_w) / 2)
    window = tf.stack(
        [
            tf.where(found, top, fb_top),
            tf.where(found, left, fb_left),
            tf.where(found, h, fb_h),
            tf.where(found, w, fb_w),
        ],
        axis=1,
    )
    return tf.cast(window, tf.int32)


def crop_and_resize_batch(
    images: tf.Tensor, windows: tf.Tensor, image_size: int, flip: tf.Tensor | None = None
) -> tf.Tensor:
    """Crop windows [N, 4] (top, left, h, w) out of equally sized images, resize to S x S.

    One `crop_and_resize` for the batch. The boxes are placed so that output pixel k samples
    the source at top + (k + 0.5) * h / S - 0.5, the half-pixel convention of torchvision's and
    tf.image.resize's bilinear resize; a one-pixel replicated border stands in for their
    clamping at the image's edge. Two differences from resizing the cut-out crop: when a crop
    is upscaled, the outermost output rows/columns (sample points up to half a source pixel
    outside the crop) blend in the neighbouring source pixel instead of repeating the crop's
    edge; and shrinking has no antialiasing (slightly aliased for large crops; the per-file
    path antialiases). Returns float32 in the input's value range.
    """
    images = tf.convert_to_tensor(images)
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    size = tf.cast(tf.shape(images)[1:3], tf.float32)
    windows = tf.cast(windows, tf.float32)
    top, left, h, w = tf.unstack(windows, axis=1)
    s = float(image_size)
    denom_y, denom_x = size[0] + 1.0, size[1] + 1.0  # padded size - 1
    y1 = (top + 0.5 + 0.5 * h / s) / denom_y
    y2 = (top + 0.5 + h - 0.5 * h / s) / denom_y
    x1 = (left + 0.5 + 0.5 * w / s) / denom_x
    x2 = (left + 0.5 + w - 0.5 * w / s) / denom_x
    if flip is not None:
        x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)
    boxes = tf.stack([y1, x1, y2, x2], axis=1)
    # A static batch size where known: with unknown box counts grappler's cost model logs
    # "Error in PredictCost()" for CropAndResize on every trace (tensorflow#56904).
    n = images.shape[0]
    if n is not None:
        boxes.set_shape([n, 4])
    else:
        n = tf.shape(images)[0]
    return tf.image.crop_and_resize(
        tf.cast(padded, tf.float32), boxes, tf.range(n), [image_size, image_size], method="bilinear"
    )


# Shrinking by more than this factor goes through the antialiased resize.
ANTIALIAS_ABOVE = 2.0


def resize_uint8(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Bilinear resize of one image to uint8 (rounded, as PIL keeps uint8 after its resize).

    PIL, in the official pipeline, always antialiases. TF's antialiased resize is ~5x slower
    than the plain one, and up to a 2x shrink the plain one is nearly the same: upscaling is
    identical, and at exactly 2x the half-pixel bilinear samples average pixel pairs, i.e. the
    box filter. So only crops shrunk by more than 2x (rare at 224 from ImageNet-size photos)
    pay for antialiasing.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    shrink = tf.reduce_max(shape / tf.constant([height, width], tf.float32))
    resized = tf.cond(
        shrink > ANTIALIAS_ABOVE,
        lambda: tf.image.resize(image, [height, width], method="bilinear", antialias=True),
        lambda: tf.image.resize(image, [height, width], method="bilinear"),
    )
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def is_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """Whether the encoded image bytes start with the JPEG SOI marker."""
    return tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] (first frame of a GIF)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def random_crops_encoded(
    encoded: tf.Tensor,
    image_size: int,
    num_views: int = 2,
    seed: tf.Tensor | int | None = None,
    scale: tuple[float, float] = PRETRAIN_CROP_SCALE,
    flip: bool = True,
) -> tf.Tensor:
    """One encoded image -> `num_views` independent random resized crops, uint8 [V, S, S, 3].

    For JPEG the windows are drawn from the header's size and only they are decoded; other
    formats are decoded once and cropped. With `flip`, each crop is mirrored with p=0.5 (the
    pipeline's RandomHorizontalFlip, moved here because it commutes with the later ops).
    """
    seed = as_seed(seed)
    s_win, s_flip = split_seed(seed, 2)
    flips = _bernoulli(num_views, 0.5 if flip else 0.0, s_flip)

    def windows_for(shape):
        return sample_crop_windows(tf.fill([num_views], shape[0]), tf.fill([num_views], shape[1]), s_win, scale=scale)

    def finish(crop, v):
        crop = resize_uint8(crop, image_size, image_size)
        return tf.cond(flips[v], lambda: tf.reverse(crop, axis=[1]), lambda: crop)

    def from_jpeg():
        windows = windows_for(tf.image.extract_jpeg_shape(encoded))
        return tf.stack(
            [finish(tf.image.decode_and_crop_jpeg(encoded, windows[v], channels=3), v) for v in range(num_views)]
        )

    def from_other():
        image = decode_image(encoded)
        windows = windows_for(tf.shape(image))
        return tf.stack(
            [
                finish(tf.slice(image, [windows[v, 0], windows[v, 1], 0], [windows[v, 2], windows[v, 3], 3]), v)
                for v in range(num_views)
            ]
        )

    views = tf.cond(is_jpeg(encoded), from_jpeg, from_other)
    views.set_shape([num_views, image_size, image_size, 3])
    return views


# ----------------------------------------------------------------------------------------------
# ColorJitter, grayscale, blur: batched, images float32 in [0, 1], per-image factors [N]


def rgb_to_grayscale(images: tf.Tensor) -> tf.Tensor:
    """[..., 3] -> [..., 1] luma with ITU-R 601 weights."""
    # matvec: one pass over the pixels (a multiply then a reduce_sum would be two).
    return tf.linalg.matvec(images, tf.constant(GRAY_WEIGHTS, images.dtype))[..., None]


def _blend(images, other, factors):
    # f * images + (1 - f) * other, written with one op fewer: these passes over the batch
    # are what the jitter costs.
    f = tf.reshape(factors, [-1, 1, 1, 1])
    return tf.clip_by_value(other + f * (images - other), 0.0, 1.0)


def adjust_brightness(images: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """torchvision adjust_brightness per image: blend with black."""
    # images >= 0 and factor >= 0: only the upper clip can bite.
    return tf.minimum(images * tf.reshape(factors, [-1, 1, 1, 1]), 1.0)


def adjust_contrast(images: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """torchvision adjust_contrast per image: blend with the mean of the image's grayscale."""
    mean = tf.reduce_mean(rgb_to_grayscale(images), axis=[1, 2, 3], keepdims=True)
    return _blend(images, mean, factors)


def adjust_saturation(images: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """torchvision adjust_saturation per image: blend with the image's grayscale."""
    return _blend(images, rgb_to_grayscale(images), factors)


def adjust_hue(images: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """torchvision adjust_hue per image: shift the HSV hue by factor (in turns, |f| <= 0.5).

    TF's fused AdjustHue kernel (RGB -> HSV, shift, back in one pass) takes one delta, so it
    runs image by image; that is still ~2.5x faster than the batched rgb_to_hsv round trip.
    """
    hued = tf.map_fn(
        lambda args: tf.image.adjust_hue(args[0], args[1]),
        (images, tf.cast(factors, images.dtype)),
        fn_output_signature=images.dtype,
    )
    return tf.reshape(hued, tf.shape(images))  # map_fn over no images loses the inner shape


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def adjust_hue_batched(images: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """`adjust_hue` as one batched HSV round trip: the form XLA compiles (the fused kernel takes
    one delta per call)."""
    hsv = tf.image.rgb_to_hsv(images)
    hue = tf.math.floormod(hsv[..., 0] + tf.reshape(tf.cast(factors, images.dtype), [-1, 1, 1]), 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))


def jitter_params(
    n: tf.Tensor | int, strength: tuple[float, float, float, float], p: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """RandomApply(ColorJitter(*strength), p) draws for n images, as torchvision makes them.

    Returns factors float32 [n, 4] (brightness, contrast, saturation ~ U[max(0, 1-s), 1+s], hue
    ~ U[-h, h]), order int32 [n, 4] (a random permutation of the four ops per image, like
    torch.randperm(4)) and applied bool [n]. Ops of strength 0 are skipped (set to -1 in order),
    as torchvision leaves them None.
    """
    s_apply, s_order, *s_factor = split_seed(seed, 6)
    factors = []
    for k, (s, sd) in enumerate(zip(strength, s_factor, strict=True)):
        low, high = (max(0.0, 1.0 - s), 1.0 + s) if k < 3 else (-s, s)
        factors.append(_uniform([n], sd, low, high))
    order = tf.argsort(_uniform([n, 4], s_order), axis=1)  # int32
    enabled = tf.constant([s > 0 for s in strength])
    order = tf.where(tf.gather(enabled, order), order, -1)
    return tf.stack(factors, axis=1), order, _bernoulli(n, p, s_apply)


def apply_jitter(
    images: tf.Tensor, factors: tf.Tensor, order: tf.Tensor, applied: tf.Tensor, static_shapes: bool = False
) -> tf.Tensor:
    """The jitter ops in each image's own order (see `jitter_params`), batched.

    Each of the 4 stages splits the batch by the op each image needs there
    (`dynamic_partition`), so every image pays for exactly its own ops, and images left out by
    `applied` pay for none. `static_shapes`: each stage instead computes the blend and the hue
    shift for the whole batch and selects per image (see the module docstring).
    """
    if static_shapes:
        return _apply_jitter_static(images, factors, order, applied)
    n = tf.shape(images)[0]
    index = tf.range(n)
    for stage in range(4):
        op = order[:, stage]
        op = tf.where(applied & (op >= 0), op, 4)  # 4 = leave unchanged
        parts = tf.dynamic_partition(images, op, 5)
        indices = tf.dynamic_partition(index, op, 5)
        outs = [fn(parts[k], tf.dynamic_partition(factors[:, k], op, 5)[k]) for k, fn in enumerate(_ADJUST)]
        images = tf.dynamic_stitch(indices, outs + [parts[4]])
    return images


def _apply_jitter_static(images, factors, order, applied):
    for stage in range(4):
        op = tf.where(applied & (order[:, stage] >= 0), order[:, stage], 4)  # 4 = leave unchanged
        factor = tf.gather(factors, tf.minimum(op, 3), batch_dims=1)
        op = tf.reshape(op, [-1, 1, 1, 1])
        # Brightness, contrast and saturation are one blend, with black, the grayscale mean or
        # the grayscale image: one pass for the three.
        gray = rgb_to_grayscale(images)
        mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
        other = tf.where(op == 1, mean, tf.where(op == 2, gray, tf.zeros_like(mean)))
        blended = _blend(images, other, factor)
        hued = tf.cond(
            tf.reduce_any(op == 3),
            lambda: adjust_hue_batched(images, tf.where(tf.reshape(op, [-1]) == 3, factor, 0.0)),  # noqa: B023
            lambda: images,  # noqa: B023
        )
        images = tf.where(op == 3, hued, tf.where(op == 4, images, blended))
    return images


def color_jitter(
    images: tf.Tensor,
    strength: tuple[float, float, float, float],
    p: float,
    seed: tf.Tensor,
    static_shapes: bool = False,
) -> tf.Tensor:
    """RandomApply(ColorJitter(*strength), p) on each image of a batch (float32 in [0, 1])."""
    return apply_jitter(images, *jitter_params(tf.shape(images)[0], strength, p, seed), static_shapes=static_shapes)


def random_grayscale(images: tf.Tensor, p: float, seed: tf.Tensor, static_shapes: bool = False) -> tf.Tensor:
    """RandomGrayscale(p): luma copied to the 3 channels, per image."""
    if static_shapes:
        chosen = tf.reshape(_bernoulli(tf.shape(images)[0], p, seed), [-1, 1, 1, 1])
        return tf.where(chosen, rgb_to_grayscale(images), images)
    chosen = tf.where(_bernoulli(tf.shape(images)[0], p, seed))  # [M, 1]
    subset = tf.gather_nd(images, chosen)
    gray = tf.broadcast_to(rgb_to_grayscale(subset), tf.shape(subset))
    return tf.tensor_scatter_nd_update(images, chosen, gray)


def blur_radius(image_size: int) -> int:
    """Half-width of the blur kernel: 3 sigma of the largest sigma at this image size."""
    return max(1, math.ceil(3.0 * BLUR_SIGMA[1] * image_size / REFERENCE_SIZE))


def gaussian_kernels(sigmas: tf.Tensor, radius: int) -> tf.Tensor:
    """Normalised 1-D Gaussian kernels [N, 2 * radius + 1] for per-image sigmas [N] (pixels)."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(x[None, :] / tf.reshape(sigmas, [-1, 1])))
    return k / tf.reduce_sum(k, axis=1, keepdims=True)


def gaussian_blur(images: tf.Tensor, sigmas: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur with a sigma per image; border pixels replicated at the edges.

    The batch is laid out as the channels of one image so that a single depthwise convolution
    applies every image's own kernel.
    """
    n = tf.shape(images)[0]
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    kernels = tf.repeat(gaussian_kernels(sigmas, radius), 3, axis=0)  # [3N, K], one per channel
    x = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, n * 3])
    rows = tf.clip_by_value(tf.range(-radius, height + radius), 0, height - 1)
    cols = tf.clip_by_value(tf.range(-radius, width + radius), 0, width - 1)
    x = tf.gather(tf.gather(x, rows, axis=1), cols, axis=2)
    kt = tf.transpose(kernels)  # [K, 3N]
    x = tf.nn.depthwise_conv2d(x, kt[:, None, :, None], [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kt[None, :, :, None], [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(x, [height, width, n, 3]), [2, 0, 1, 3])


def random_gaussian_blur(
    images: tf.Tensor, p: float, image_size: int, seed: tf.Tensor, static_shapes: bool = False
) -> tf.Tensor:
    """RandomApply(GaussianBlur(sigma ~ U[0.1, 2] * S / 224), p): only chosen images are blurred
    (`static_shapes`: all are, and the chosen ones kept)."""
    n = tf.shape(images)[0]
    s_apply, s_sigma = split_seed(seed, 2)
    scale = image_size / REFERENCE_SIZE
    sigmas = _uniform([n], s_sigma, BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale)
    if static_shapes:
        chosen = tf.reshape(_bernoulli(n, p, s_apply), [-1, 1, 1, 1])
        return tf.where(chosen, gaussian_blur(images, sigmas, blur_radius(image_size)), images)
    chosen = tf.where(_bernoulli(n, p, s_apply))  # [M, 1]
    subset = tf.gather_nd(images, chosen)
    # With no image chosen (likely in small batches) the depthwise conv would get an empty filter.
    blurred = tf.cond(
        tf.shape(chosen)[0] > 0,
        lambda: gaussian_blur(subset, tf.gather_nd(sigmas, chosen), blur_radius(image_size)),
        lambda: subset,
    )
    return tf.tensor_scatter_nd_update(images, chosen, blurred)


# ----------------------------------------------------------------------------------------------
# whole views


def color_views(
    images_float01: tf.Tensor,
    version: str,
    image_size: int,
    seed: tf.Tensor,
    blur: bool = True,
    static_shapes: bool = False,
) -> tf.Tensor:
    """Everything after crop and flip: jitter, grayscale, blur (v2, unless `blur` is False),
    normalisation.

    A batch of cropped views in [0, 1] -> normalised float32, each view with its own draws.
    `static_shapes`: the accelerator's form (same draws, compiles with XLA).
    """
    cfg = _config(version)
    s_jitter, s_gray, s_blur = split_seed(as_seed(seed), 3)
    x = tf.cast(images_float01, tf.float32)
    jitter = (cfg["jitter"], cfg["jitter_p"], s_jitter, static_shapes)
    if cfg["gray_first"]:
        x = random_grayscale(x, cfg["gray_p"], s_gray, static_shapes)
        x = color_jitter(x, *jitter)
    else:
        x = color_jitter(x, *jitter)
        x = random_grayscale(x, cfg["gray_p"], s_gray, static_shapes)
    if blur and cfg["blur_p"] > 0:
        x = random_gaussian_blur(x, cfg["blur_p"], image_size, s_blur, static_shapes)
    x = normalize(x)
    x.set_shape([None, image_size, image_size, 3])
    return x


def crop_batch(
    images_uint8: tf.Tensor,
    image_size: int = 224,
    seed: int | tf.Tensor | None = None,
    options: ViewOptions = OFFICIAL_VIEWS,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The crop (and flip) of `augment_batch`: uint8 [N, H, W, 3] -> (uint8 crops [N, S, S, 3],
    the seed of their colour stage). `color_views(crops / 255, ..., that seed)` finishes the views."""
    images = tf.convert_to_tensor(images_uint8)
    _check_batch(images)
    s_crop, s_flip, s_color = split_seed(as_seed(seed), 3)
    n, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    windows = sample_crop_windows(tf.fill([n], height), tf.fill([n], width), s_crop, scale=options.crop_scale)
    flip = _bernoulli(n, 0.5, s_flip) if options.flip else None
    crops = crop_and_resize_batch(images, windows, image_size, flip=flip)
    # PIL keeps uint8 after the resize: round like it (the bilinear samples stay in [0, 255]).
    return tf.cast(tf.round(crops), tf.uint8), s_color


def augment_batch(
    images_uint8: tf.Tensor,
    version: str = "v2",
    image_size: int = 224,
    seed: int | tf.Tensor | None = None,
    options: ViewOptions = OFFICIAL_VIEWS,
) -> tf.Tensor:
    """One MoCo view of each image: uint8 [N, H, W, 3] -> normalised float32 [N, S, S, 3].

    All images of the batch share H and W (decoded, fixed-size data such as CIFAR); one crop and
    resize op handles the whole batch. Deterministic for a given `seed` (int or [2] tensor).
    `options` changes crop scale, flip and blur (default: the official recipe). The seed is
    split the same way whatever the options, so changing one leaves the other draws as they were.
    """
    _config(version)
    crops, color_seed = crop_batch(images_uint8, image_size, seed, options)
    return color_views(tf.cast(crops, tf.float32) / 255.0, version, image_size, color_seed, blur=options.blur)


def _check_batch(images: tf.Tensor) -> None:
    shape = images.shape
    if shape.rank != 4 or shape[-1] != 3:
        raise ValueError(f"augment_batch wants uint8 images [N, H, W, 3], got shape {shape}")


def augment_crops(
    crops_uint8: tf.Tensor,
    version: str = "v2",
    image_size: int = 224,
    seed: int | tf.Tensor | None = None,
    options: ViewOptions = OFFICIAL_VIEWS,
) -> tf.Tensor:
    """Already cropped (and flipped) uint8 views [N, S, S, 3] -> normalised float32 views
    (`options.blur` applies here; crop scale and flip were the crop's, `random_crops_encoded`)."""
    return color_views(tf.cast(crops_uint8, tf.float32) / 255.0, version, image_size, as_seed(seed), options.blur)


def views_from_crops(
    crops_uint8: tf.Tensor,
    color_seed: tf.Tensor,
    version: str,
    image_size: int,
    blur: bool = True,
    static_shapes: bool = False,
) -> tf.Tensor:
    """The colour stage of a batch of crop pairs: uint8 [N, 2, S, S, 3] -> float32 views, alike.

    `color_seed`: int64 [2], one draw over the 2N crops in image-major order (the pairs cropped
    from files), or [2, 2], view v of every image drawn from seed v (`crop_batch` per view).
    The pipeline calls it on the host; the model's `ColorStage` in the train step (`static_shapes`).
    """
    crops = tf.convert_to_tensor(crops_uint8)
    n = tf.shape(crops)[0]
    color_seed = tf.convert_to_tensor(color_seed)
    if color_seed.shape.rank == 2:
        floats = tf.cast(crops, tf.float32) / 255.0
        views = tf.stack(
            [color_views(floats[:, v], version, image_size, color_seed[v], blur, static_shapes) for v in range(2)],
            axis=1,
        )
    else:
        flat = tf.cast(tf.reshape(crops, [-1, image_size, image_size, 3]), tf.float32) / 255.0
        views = tf.reshape(
            color_views(flat, version, image_size, color_seed, blur, static_shapes), [n, 2, image_size, image_size, 3]
        )
    views.set_shape(crops.shape)
    return views


class ColorStage(keras.layers.Layer):
    """The colour stage run inside the train step: a batch's uint8 crop pairs [N, 2, S, S, 3] and its
    colour seed -> exactly the float32 views the host pipeline would have made from them
    (`views_from_crops` in its accelerator form, which compiles with XLA). No weights.

    float32 whatever the global precision policy: the draws and the views must be the host's.
    """

    def __init__(self, version: str, image_size: int, blur: bool = True, **kwargs):
        super().__init__(**{**kwargs, "dtype": "float32"})
        _config(version)  # a ValueError naming the known versions
        self.version, self.image_size, self.blur = version, image_size, blur

    def call(self, crops: tf.Tensor, color_seed: tf.Tensor) -> tf.Tensor:
        if crops.dtype != tf.uint8:
            raise ValueError(
                f"the colour stage colours uint8 crops, got {crops.dtype.name} views: the batch is already "
                "coloured (pretrain_dataset(color_in_step=False)); build MoCo with color_in_step=False"
            )
        return views_from_crops(crops, color_seed, self.version, self.image_size, self.blur, static_shapes=True)

    def compute_output_shape(self, crops_shape, color_seed_shape=None):
        return crops_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "version": self.version, "image_size": self.image_size, "blur": self.blur}


# ----------------------------------------------------------------------------------------------
# eval


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: 256 for 224, scaled alike for other sizes."""
    return int(round(image_size * 256 / 224))


def eval_transform(image_uint8: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize(S * 256 / 224) + CenterCrop(S) + normalise: uint8 [H, W, 3] -> float32 [S, S, 3].

    As torchvision on a PIL image: the shorter side becomes the target, the longer one
    int(target * long / short); antialiased bilinear; crop offsets int(round((size - S) / 2)).
    """
    image = tf.convert_to_tensor(image_uint8)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    target = tf.constant(float(eval_resize_size(image_size)), tf.float64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    long_new = tf.floor(target * long / short)
    new_h = tf.cast(tf.where(h <= w, target, long_new), tf.int32)
    new_w = tf.cast(tf.where(h <= w, long_new, target), tf.int32)
    resized = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    crop = tf.slice(resized, [top, left, 0], [image_size, image_size, 3])
    crop.set_shape([image_size, image_size, 3])
    return normalize(crop / 255.0)


def _config(version: str) -> dict:
    if version not in VERSIONS:
        raise ValueError(f"unknown augmentation {version!r}: use one of {sorted(VERSIONS)}")
    return VERSIONS[version]
