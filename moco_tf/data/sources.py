"""Image sources: TFDS, image folders and the embedded digits set, checked when they are made.

A `Source` is checked when it is made: every user mistake (unknown name, missing or empty
folder, unprepared TFDS data, corrupt files with `strict`) raises `DataError` with one line
that says what to do, before any training starts. Offline, TFDS would retry a download for
minutes, so nothing here lets it download: the prepared files are looked for on disk. The
tf.data pipelines that read a source are in `moco_tf.data.pipelines`.

An image folder is only listed at start (no file is opened: start-up does not grow with the
number of files, which on gs:// would be one request per file); a file that turns out not to
decode is handled by the pipeline, which replaces or drops it and records it in
`Source.undecodable` (`UndecodableFiles`), reported once per epoch and in TensorBoard.
Strict mode (`make_source(..., strict=True)`, --strict_data) instead decodes every file of a
folder in full at start and refuses the first broken one: the only way to find a JPEG cut short
that still ends in an end marker, at the cost of one full decode per file before training (its
cost: benchmarks/RESULTS.md, "Strict data check"). simplejpeg, where installed, decodes faster
and, unlike TensorFlow's decoder, notices grey-filled JPEGs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import threading

import numpy as np
import tensorflow as tf

from moco_tf.errors import UserError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# The smallest view side that still leaves a few pixels in a 0.2-area crop and through a
# CIFAR-stem ResNet; smaller requests are a mistake, not a choice.
MIN_IMAGE_SIZE = 16
# Shuffle buffer for datasets read as records (file lists are shuffled whole): enough to mix
# TFDS's interleaved shards, small enough for ImageNet's ~110 KB JPEGs (~1 GB).
RECORD_SHUFFLE_BUFFER = 10_000
DIGITS_SIZE = 32
# Splits of the TFDS datasets MoCo is usually run on: (pretrain, train, eval).
TFDS_SPLITS = {
    "stl10": ("unlabelled", "train", "test"),
    "imagenet2012": ("train", "train", "validation"),
}


class DataError(UserError):
    """A data set the user asked for cannot be used; the message says what to do, in one line."""


# Files named one by one in the log as they are first found; the rest only in the summaries.
_LOGGED_UNDECODABLE = 5


class UndecodableFiles:
    """The files of a source that its pipelines could not decode, as they are found.

    The pipelines run ahead of training in background threads (`record` is called from a
    tf.py_function), so this is a lock-guarded set. A file is counted once however often it
    is met (every epoch, in kNN passes); `occurrences` counts every time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, None] = {}  # insertion-ordered set
        self.occurrences = 0

    def record(self, paths) -> None:
        new = []
        with self._lock:
            for path in paths:
                path = path.decode() if isinstance(path, bytes) else str(path)
                self.occurrences += 1
                if path not in self._paths:
                    self._paths[path] = None
                    new.append((len(self._paths), path))
        for n, path in new:
            if n <= _LOGGED_UNDECODABLE:
                log.warning("cannot decode image %s: skipped (run with --strict_data to refuse such files)", path)

    @property
    def paths(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._paths)

    def __len__(self) -> int:
        with self._lock:
            return len(self._paths)

    def summary(self, shown: int = 5) -> str:
        """One line: the count and the first `shown` paths ("" when there are none)."""
        paths = self.paths
        if not paths:
            return ""
        more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
        return (
            f"{len(paths)} image file(s) could not be decoded and were skipped (replaced by another "
            f"image of their batch in pretraining): {', '.join(paths[:shown])}{more}"
        )


@dataclasses.dataclass
class Source:
    """A data set: where its splits come from and what they hold.

    `kind` is "files" (paths + labels, read from disk), "tfds" (a prepared TFDS builder, images
    kept encoded) or "arrays" (uint8 images in memory). Labels are -1 where there are none.
    """

    name: str
    kind: str
    num_classes: int | None
    pretrain_split: str
    train_split: str
    eval_split: str | None
    class_names: tuple[str, ...] = ()
    min_image_size: int = MIN_IMAGE_SIZE
    # kind == "files": split -> (paths, labels); kind == "arrays": split -> (images, labels)
    splits: dict = dataclasses.field(default_factory=dict, repr=False)
    builder: object = dataclasses.field(default=None, repr=False)  # kind == "tfds"
    strict: bool = False
    # Files its pipelines found undecodable (kind "files"), filled while they run.
    undecodable: UndecodableFiles = dataclasses.field(default_factory=UndecodableFiles, repr=False)

    def num_examples(self, split: str) -> int:
        """Number of images in `split`."""
        self._check_split(split)
        if self.kind == "tfds":
            return int(self.builder.info.splits[split].num_examples)
        return len(self.splits[split][1])

    @property
    def split_names(self) -> tuple[str, ...]:
        if self.kind == "tfds":
            return tuple(self.builder.info.splits.keys())
        return tuple(self.splits)

    def _check_split(self, split: str) -> None:
        if split not in self.split_names:
            raise DataError(
                f"dataset {self.name!r} has no split {split!r}; it has {', '.join(self.split_names)}"
            )

    def examples(
        self,
        split: str,
        input_context: tf.distribute.InputContext | None = None,
        shuffle: bool = False,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        """(image, label int32) per example, sharded by input pipeline; images are encoded bytes
        (`kind` files/tfds) or uint8 [H, W, 3] (arrays). Shuffled (every epoch anew) if asked."""
        self._check_split(split)
        n_shards, shard = (
            (input_context.num_input_pipelines, input_context.input_pipeline_id) if input_context else (1, 0)
        )
        if self.kind == "tfds":
            import tensorflow_datasets as tfds

            read_config = tfds.ReadConfig(
                input_context=input_context, shuffle_seed=seed, interleave_cycle_length=16
            )
            ds = self.builder.as_dataset(
                split=split,
                shuffle_files=shuffle,
                read_config=read_config,
                decoders={"image": tfds.decode.SkipDecoding()},
            )
            has_label = "label" in self.builder.info.features
            ds = ds.map(
                lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1)),
                num_parallel_calls=AUTOTUNE,
            )
            if shuffle:
                ds = ds.shuffle(RECORD_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
            return ds
        data, labels = self.splits[split]
        ds = tf.data.Dataset.from_tensor_slices((data, np.asarray(labels, np.int32)))
        if n_shards > 1:
            ds = ds.shard(n_shards, shard)
        if shuffle:
            ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        if self.kind == "files":
            ds = ds.map(lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=AUTOTUNE)
        return ds


# ----------------------------------------------------------------------------------------------
# making sources


def make_source(dataset: str, data_dir: str | None = None, strict: bool = False) -> Source:
    """The data set named `dataset`, checked; raises DataError with what to do if unusable.

    "digits": the embedded default (scikit-learn's handwritten digits, 32x32 RGB); takes no
        `data_dir`.
    "folder": `data_dir` with one subfolder per class (images found recursively), or with
        train/ and val/ (or test/) folders of class subfolders; images directly in `data_dir`
        form an unlabelled set. Only listed here (files with an image extension): a file that
        does not decode is skipped by the pipelines and named in `Source.undecodable`. With
        `strict`, every file is read and decoded in full here and the first broken one stops
        the run (see `_decode_problem`: it also finds a JPEG cut short that ends in an end
        marker anyway, which decodes with its missing part filled grey).
    anything else: a TFDS name, read from `data_dir` (may be gs://) or TFDS's default folder.
    """
    if not dataset:
        raise DataError(
            "no dataset given: use --dataset=digits, --dataset=folder --data_dir=DIR, or a TFDS name"
        )
    if dataset == "digits":
        if data_dir:
            # Silently training on the embedded set when the user pointed at their own data
            # would waste the run.
            raise DataError(
                f"--data_dir is not used with --dataset=digits (the embedded set): drop --data_dir={data_dir}, "
                "or use --dataset=folder for an image folder or a TFDS name for prepared TFDS data"
            )
        return _digits_source()
    if dataset == "folder":
        return _folder_source(data_dir, strict)
    return _tfds_source(dataset, data_dir)


def _digits_source() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 values 0..16 -> 0..255, upscaled (antialiased bilinear) to 32x32, gray -> RGB.
    small = (digits.images.astype(np.float32) * (255.0 / 16.0))[..., None]
    big = tf.image.resize(small, [DIGITS_SIZE, DIGITS_SIZE], method="bilinear", antialias=True)
    images = np.repeat(np.clip(np.round(big.numpy()), 0, 255).astype(np.uint8), 3, axis=-1)
    labels = digits.target.astype(np.int32)
    # A fixed held-out split: every 5th image (the set cycles through the classes, so the
    # split is close to stratified): 1438 train, 359 test.
    test = np.arange(len(labels)) % 5 == 4
    return Source(
        name="digits",
        kind="arrays",
        num_classes=10,
        pretrain_split="train",
        train_split="train",
        eval_split="test",
        class_names=tuple(str(d) for d in range(10)),
        min_image_size=MIN_IMAGE_SIZE,
        splits={"train": (images[~test], labels[~test]), "test": (images[test], labels[test])},
    )


def _folder_source(data_dir: str | None, strict: bool) -> Source:
    if not data_dir:
        raise DataError(
            "--dataset=folder needs --data_dir=DIR, a folder with one subfolder of images per class"
        )
    if not tf.io.gfile.isdir(data_dir):
        raise DataError(f"--data_dir={data_dir} is not a folder: give the folder that holds your images")
    entries = set(tf.io.gfile.listdir(data_dir))
    entries = {e.rstrip("/") for e in entries}
    layout = {}
    if "train" in entries and tf.io.gfile.isdir(os.path.join(data_dir, "train")):
        layout["train"] = os.path.join(data_dir, "train")
        for name in ("val", "test"):
            if name in entries and tf.io.gfile.isdir(os.path.join(data_dir, name)):
                layout[name] = os.path.join(data_dir, name)
                break
    else:
        layout["train"] = data_dir
    class_names = _class_names(layout["train"])
    splits = {}
    for split, folder in layout.items():
        paths, labels = _list_images(folder, class_names)
        if not paths:
            raise DataError(
                f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}: put your images there, "
                "one subfolder per class"
            )
        if strict:
            bad = _validate_files(paths, decode=True)[1]
            if bad:
                raise DataError(
                    f"unreadable image {bad[0][0]} ({bad[0][1]}): fix or remove it, or drop --strict_data"
                )
        splits[split] = (np.array(paths), np.array(labels, np.int32))
    eval_split = next((s for s in ("val", "test") if s in splits), None)
    return Source(
        name=f"folder:{data_dir}",
        kind="files",
        num_classes=len(class_names) or None,
        pretrain_split="train",
        train_split="train",
        eval_split=eval_split,
        class_names=tuple(class_names),
        splits=splits,
        strict=strict,
    )


def _entries(folder: str) -> tuple[list[str], list[str]]:
    """(subfolders, files) directly in `folder`, sorted, with no request per entry.

    tf.io.gfile.isdir per entry (what tf.io.gfile.walk does) is a stat per file locally and a
    request per object on gs://: ImageNet's 1.28 M files would cost 1.28 M round trips. Local
    folders: os.scandir (the kind of each entry comes with the listing). gs://: the listing
    marks subfolders with a trailing "/" (one list call per 1,000 objects). Other file
    systems: isdir per entry, as before.
    """
    if "://" not in folder:
        with os.scandir(folder) as it:
            items = [(e.name, e.is_dir()) for e in it]
    elif folder.startswith("gs://"):
        items = [(e.rstrip("/"), e.endswith("/")) for e in tf.io.gfile.listdir(folder)]
    else:
        items = [(e.rstrip("/"), tf.io.gfile.isdir(os.path.join(folder, e))) for e in tf.io.gfile.listdir(folder)]
    return sorted(n for n, d in items if d), sorted(n for n, d in items if not d)


def _walk_files(root: str) -> list[str]:
    """Every file path under `root`, folder by folder in sorted order of the folders' paths
    (the order sorted(tf.io.gfile.walk(root)) gave: a resumed run needs the same order)."""
    folders: list[tuple[str, list[str]]] = []
    pending: list[tuple[str, frozenset[str]]] = [(root, _ancestors(root))]
    while pending:
        folder, above = pending.pop()
        if "://" not in folder:
            # A symbolic link to a folder above it (a loop) is skipped: followed, it would list the
            # same images again and again until the path is too long. Other links are followed.
            real = os.path.realpath(folder)
            if real in above:
                continue
            above = above | {real}
        subfolders, files = _entries(folder)
        folders.append((folder, files))
        pending += [(os.path.join(folder, sub), above) for sub in subfolders]
    # One join per folder, not per file (os.path.join is most of a 100k-file listing's time).
    return [prefix + f for folder, files in sorted(folders) for prefix in [os.path.join(folder, "")] for f in files]


def _ancestors(folder: str) -> frozenset[str]:
    """The real paths of the folders above `folder` (a link to one of them is a loop)."""
    if "://" in folder:
        return frozenset()
    found, path = set(), os.path.dirname(os.path.realpath(folder))
    while path not in found:
        found.add(path)
        path = os.path.dirname(path)
    return frozenset(found)


def _class_names(folder: str) -> list[str]:
    return _entries(folder)[0]


def _list_images(folder: str, class_names: list[str]) -> tuple[list[str], list[int]]:
    """Image paths under `folder` (by extension: listing only, no file opened): in class
    subfolders (recursively) with their class index, and directly in `folder` with label -1
    when there are no class subfolders."""
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for path in _walk_files(os.path.join(folder, name)):
            if path.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(path)
                labels.append(label)
    if not class_names:
        for f in _entries(folder)[1]:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, f))
                labels.append(-1)
    return paths, labels


# Magic bytes of the formats tf.io.decode_image reads.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a")
_END_MARKERS = {b"\xff\xd8\xff": b"\xff\xd9", b"\x89PN": b"IEND"}


def _check_file(path: str, decode: bool = False) -> str | None:
    """Why `path` cannot be an image (None if it looks fine). Cheap: reads the first 16 bytes,
    and for JPEG and PNG the last KiB, where the end marker (JPEG EOI, PNG IEND) must be: it is
    missing when a download or copy was cut short. (Some JPEGs carry bytes after EOI, hence a KiB.)
    With `decode`, a file that passes is also read whole and decoded (`_decode_problem`)."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(16)
            end_marker = _END_MARKERS.get(head[:3])
            if end_marker:
                size = f.size()
                f.seek(max(16, size - 1024))
                if end_marker not in f.read():
                    return "truncated file (no end-of-image marker)"
            if decode and head.startswith(_MAGIC):
                f.seek(0)
                return _decode_problem(f.read())
    except (OSError, tf.errors.OpError) as e:
        return f"cannot read: {e}"
    if not head:
        return "empty file"
    if not head.startswith(_MAGIC):
        return "not a JPEG, PNG, BMP or GIF file"
    return None


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _decode_problem(encoded: bytes) -> str | None:
    """Why these image bytes do not decode cleanly (None if they do).

    JPEG, when the `simplejpeg` package is installed: a full libjpeg-turbo decode that treats
    libjpeg's warnings as errors. That is what finds a JPEG cut short that still ends in an
    end marker (appended, or a copy that kept the tail): libjpeg reports "premature end of data
    segment", fills the rest grey, and TensorFlow's decoder takes the result without a word.
    Other formats, and JPEG without simplejpeg: TensorFlow's own full decode (what the pipeline
    runs), which finds only the truncations libjpeg cannot fill in.
    """
    simplejpeg = _simplejpeg()
    if encoded.startswith(b"\xff\xd8\xff") and simplejpeg is not None:
        try:
            colorspace = simplejpeg.decode_jpeg_header(encoded)[2]
            # libjpeg-turbo converts no CMYK/YCCK to RGB (TensorFlow does): decode as stored.
            simplejpeg.decode_jpeg(
                encoded, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "RGB", strict=True
            )
        except ValueError as e:
            return f"corrupt JPEG data: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        return None
    try:
        tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        # TF prefixes the kernel's name ({{function_node ...}}) and appends [Op:...].
        message = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:.*$", "", e.message.splitlines()[0] if e.message else "")
        return f"cannot be decoded: {message or type(e).__name__}"
    return None


def _validate_files(paths: list[str], decode: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Split paths into readable images and (path, reason) for the others, in order.

    Strict mode's up-front check (threads, since much of it is I/O): the header and tail of
    every file (empty, truncated and non-image files) and, with `decode`, a full decode (see
    `_decode_problem`; one decode per file)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        reasons = list(pool.map(lambda p: _check_file(p, decode), paths, chunksize=256))
    good = [p for p, r in zip(paths, reasons, strict=True) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]
    return good, bad


def _tfds_source(name: str, data_dir: str | None) -> Source:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"unknown dataset {name!r}: use digits, folder (with --data_dir), or a TFDS name such as cifar10"
        ) from None
    except Exception as e:  # a malformed name or config, e.g. "cifar10/nope"
        raise DataError(f"cannot open TFDS dataset {name!r}: {str(e).splitlines()[0]}") from None
    # Prepared data has its dataset_info.json in the versioned folder; without it TFDS would try
    # to download (and retry for minutes offline), so stop here and say how to prepare it.
    if not tf.io.gfile.exists(os.path.join(str(builder.data_dir), "dataset_info.json")):
        where = data_dir or "TFDS's default folder (~/tensorflow_datasets)"
        how = (
            "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar by hand into "
            "<data_dir>/downloads/manual/, then run `tfds build imagenet2012 --data_dir=<data_dir>`"
            if name.startswith("imagenet2012")
            else f"run `tfds build {name} --data_dir=<data_dir>` on a machine with network"
        )
        raise DataError(f"TFDS dataset {name!r} is not prepared in {where}: {how}")
    info = builder.info
    if "image" not in info.features:
        raise DataError(f"TFDS dataset {name!r} has no 'image' feature: pick an image dataset")
    splits = list(info.splits.keys())
    base = name.split("/")[0].split(":")[0]
    if base in TFDS_SPLITS:
        pretrain, train, evaluation = TFDS_SPLITS[base]
    else:
        pretrain = train = "train" if "train" in splits else splits[0]
        evaluation = next((s for s in ("validation", "test") if s in splits), None)
    label = info.features["label"] if "label" in info.features else None
    num_classes = getattr(label, "num_classes", None)
    return Source(
        name=name,
        kind="tfds",
        num_classes=num_classes,
        pretrain_split=pretrain,
        train_split=train,
        eval_split=evaluation if evaluation in splits else None,
        class_names=tuple(label.names) if num_classes else (),
        builder=builder,
    )
