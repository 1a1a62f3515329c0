"""MoCo: a query encoder trained by SGD, a momentum key encoder, and a queue of negative keys.

One `keras.Model`; `train_step` is the official step (facebookresearch/moco builder.py) top to
bottom, written so that it runs unchanged on one device, under MirroredStrategy,
MultiWorkerMirroredStrategy and TPUStrategy, and compiles with XLA.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from moco_tf.data.augment import ColorStage
from moco_tf.models import resnet
from moco_tf.models.backbones import BackboneSpec
from moco_tf.models.losses import info_nce

if TYPE_CHECKING:
    from moco_tf.data.pipelines import PretrainBatch


class Encoder(keras.Model):
    """Backbone followed by the projection head: images -> [N, dim] (not normalized)."""

    def __init__(self, backbone: keras.Model, head: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = head
        self.built = backbone.built and head.built

    def call(self, images, training=False):
        return self.head(self.backbone(images, training=training), training=training)


def _linear(units: int, fan_in: int, name: str) -> keras.layers.Dense:
    # torch.nn.Linear's default init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return keras.layers.Dense(
        units,
        kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name=name,
    )


def projection_head(in_dim: int, dim: int, mlp: bool) -> keras.Sequential:
    """v1: fc = Linear(in_dim, dim). v2: fc = Linear(in_dim, in_dim) -> ReLU -> Linear(in_dim, dim).

    Layer names are the official state_dict names (fc, or fc.0 and fc.2).
    """
    if mlp:
        layers = [_linear(in_dim, in_dim, "fc.0"), keras.layers.ReLU(name="fc.1"), _linear(dim, in_dim, "fc.2")]
    else:
        layers = [_linear(dim, in_dim, "fc")]
    head = keras.Sequential(layers, name="head")
    head.build((None, in_dim))
    return head


def _unit_rows(shape, dtype=None):
    return tf.math.l2_normalize(tf.random.normal(shape, dtype=dtype or "float32"), axis=1)


def _encoder(spec: BackboneSpec, dim, mlp, bn_groups, image_size, name) -> Encoder:
    backbone = spec.build(image_size=image_size, bn_groups=bn_groups)
    return Encoder(backbone, projection_head(spec.feature_dim, dim, mlp), name=name)


@keras.saving.register_keras_serializable(package="moco_tf")
class MoCo(keras.Model):
    """MoCo v1/v2 (He et al. 2019; Chen et al. 2020).

    Args:
        arch: a registered backbone (resnet18/34/50/101/152; moco_tf.models.backbones).
        dim: projection (key) dimension.
        queue_size: K, number of negative keys; a multiple of the keys enqueued per step.
        moco_momentum: m of the key encoder's moving average, in [0, 1).
        temperature: T > 0.
        mlp: the v2 two-layer projection head.
        shuffle_bn: shuffle the key batch across replicas (and across BN groups) before the
            key encoder, so BatchNorm cannot leak which key is the positive.
        bn_groups: BatchNorm statistics per group of local_batch / bn_groups samples in both
            encoders (SplitBatchNorm of the official CIFAR demo: shuffle BN on one device).
        symmetric: loss on both view orders, summed; the keys of both orders are enqueued.
        cifar_stem: 3x3 stride-1 stem, no max-pool.
        image_size: fixes the input size (static shapes); any size when None.
        width: the ResNet's base channels (64 standard; narrower only for CPU-budget experiments).
        backbone: instead of arch / width / cifar_stem, the BackboneSpec the run config holds.
        aug, blur: the view recipe's augmentation version (v1/v2) and blur, for the colour stage.
        color_in_step: the train step runs the colour stage (`augment.ColorStage`, on the
            accelerator): the batches hold uint8 crops (`pretrain_dataset(color_in_step=True)`).
            Needs image_size.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        dim: int = 128,
        queue_size: int = 65536,
        moco_momentum: float = 0.999,
        temperature: float = 0.07,
        mlp: bool = False,
        shuffle_bn: bool = True,
        bn_groups: int = 1,
        symmetric: bool = False,
        cifar_stem: bool = False,
        image_size: int | None = None,
        width: int = resnet.STANDARD_WIDTH,
        backbone: BackboneSpec | None = None,
        aug: str = "v1",
        blur: bool = True,
        color_in_step: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if backbone is None:
            backbone = BackboneSpec(arch, width, cifar_stem)  # a ValueError naming the known archs
        elif (arch, width, cifar_stem) != ("resnet50", resnet.STANDARD_WIDTH, False):
            raise ValueError("give either backbone or arch / width / cifar_stem, not both")
        arch, width, cifar_stem = backbone.arch, backbone.width, backbone.cifar_stem
        # The run config validates these for the command lines and pretrain(); kept for a MoCo built
        # directly (benchmarks, notebooks), where a bad value would train silently wrong.
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= moco_momentum < 1.0:
            raise ValueError(f"moco_momentum must be in [0, 1), got {moco_momentum}")
        if queue_size < 1 or dim < 1 or bn_groups < 1:
            raise ValueError("queue_size, dim and bn_groups must be positive")
        if color_in_step and image_size is None:
            raise ValueError("color_in_step needs image_size (the colour stage's blur scales with it)")
        self.arch, self.dim, self.queue_size = arch, dim, queue_size
        self.moco_momentum, self.temperature, self.mlp = moco_momentum, temperature, mlp
        self.shuffle_bn, self.bn_groups, self.symmetric = shuffle_bn, bn_groups, symmetric
        self.cifar_stem, self.image_size, self.width = cifar_stem, image_size, width
        self.aug, self.blur, self.color_in_step = aug, blur, color_in_step
        # Owned here, not set from outside: what the step does to a batch follows from the arguments.
        self.color_stage = ColorStage(aug, image_size, blur, name="color_stage") if color_in_step else None

        self.backbone_spec = backbone
        args = (backbone, dim, mlp, bn_groups, image_size)
        self.encoder_q = _encoder(*args, name="encoder_q")
        self.encoder_k = _encoder(*args, name="encoder_k")
        # The key encoder starts as an exact copy and is never touched by the optimizer.
        for key_weight, query_weight in zip(self.encoder_k.weights, self.encoder_q.weights, strict=True):
            key_weight.assign(query_weight)
            key_weight.trainable = False  # per variable: `encoder_k.trainable=False` would freeze BN

        # Every replica writes the same rows (keys are all-gathered first): keep replica 0's.
        self.queue = self.add_weight(
            shape=(queue_size, dim), initializer=_unit_rows, trainable=False,
            aggregation="only_first_replica", name="queue",
        )
        self.queue_ptr = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False,
            aggregation="only_first_replica", name="queue_ptr",
        )
        # Which image each queue row's key came from (its index in the pretraining split; -1: unknown),
        # to measure how often a query's own image sits among its negatives (`self_neg`).
        self.queue_ids = self.add_weight(
            shape=(queue_size,), dtype="int32", initializer=keras.initializers.Constant(UNKNOWN_ID),
            trainable=False, aggregation="only_first_replica", name="queue_ids",
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.pos_tracker = keras.metrics.Mean(name="logit_pos")
        self.neg_tracker = keras.metrics.Mean(name="logit_neg")
        self.acc_tracker = keras.metrics.Mean(name="acc")
        self.self_neg_tracker = keras.metrics.Mean(name="self_neg")
        self.built = True  # every weight exists; fit() must not build by calling on a view pair

    @property
    def backbone_q(self) -> keras.Model:
        return self.encoder_q.backbone

    @property
    def metrics(self):
        # Our own trackers only: compile()'s built-in "loss" tracker is never updated by this step.
        return [self.loss_tracker, self.pos_tracker, self.neg_tracker, self.acc_tracker, self.self_neg_tracker]

    def keys_per_step(self, global_batch_size: int) -> int:
        return global_batch_size * (2 if self.symmetric else 1)

    def check_batch_size(self, global_batch_size: int) -> None:
        """Raises ValueError unless the queue holds a whole number of steps' keys. pretrain() has
        refused such a config before; this guards a MoCo fitted directly (checked when the step traces)."""
        check_queue_fits(self.queue_size, global_batch_size, self.symmetric)
        if global_batch_size % self.bn_groups:
            raise ValueError(f"batch size {global_batch_size} is not divisible by bn_groups {self.bn_groups}")

    def call(self, images, training=False):
        """Normalized query projections of `images`."""
        return tf.math.l2_normalize(self.encoder_q(images, training=training), axis=1)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Every weight exists since __init__ and no loss or metric is compiled: only the optimizer
        # may need building. Keras's own symbolic build first reduces a batch across replicas, which
        # MultiWorkerMirroredStrategy cannot do for the PretrainBatch dict (a TypeError on every
        # multi-worker run).
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.encoder_q.trainable_variables)

    # ----------------------------------------------------------------------------- the step
    def train_step(self, data: PretrainBatch | tf.Tensor | tuple[tf.Tensor, tf.Tensor]):
        """One step on a `pipelines.PretrainBatch` (what `pretrain_dataset` yields), or, for a MoCo
        fitted directly, on its views alone: a tensor [N, 2, H, W, C] or a pair (x_q, x_k). With ids
        the step also logs `self_neg` and records the ids of the keys it enqueues (-1 without).
        With `color_in_step` the batch's views are uint8 crops, coloured here by `color_stage`."""
        x_q, x_k, ids = _unpack(data, self.color_stage)
        replica = tf.distribute.get_replica_context()
        local_batch = x_q.shape[0]
        if local_batch is not None:  # static shapes: checked while tracing, before any compute
            self.check_batch_size(local_batch * replica.num_replicas_in_sync)
            if local_batch % self.bn_groups:
                raise ValueError(f"per-replica batch {local_batch} is not divisible by bn_groups {self.bn_groups}")

        self._momentum_update_key_encoder()
        # Pairs (query view, key view); symmetric adds the swapped pair (official CIFAR demo).
        pairs = [(x_q, x_k), (x_k, x_q)] if self.symmetric else [(x_q, x_k)]
        keys = [self._shuffled_keys(key_view, salt) for salt, (_, key_view) in enumerate(pairs)]

        with tf.GradientTape() as tape:
            losses, stats = [], []
            for (query_view, _), (k_local, _) in zip(pairs, keys, strict=True):
                # float32 from here on under mixed precision: the cosine logits are sums of D products.
                q = tf.math.l2_normalize(tf.cast(self.encoder_q(query_view, training=True), self.queue.dtype), axis=1)
                loss, l_pos, l_neg = info_nce(q, k_local, tf.stop_gradient(self.queue), self.temperature)
                losses.append(loss)
                stats.append((l_pos, l_neg))
            loss = tf.add_n(losses)
            # The optimizer sums gradients over replicas: differentiate the replica's share.
            scaled = self.optimizer.scale_loss(loss / replica.num_replicas_in_sync)
        variables = self.encoder_q.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))

        if ids is not None:
            # Against the queue the loss just used, before this step's keys go in.
            self.self_neg_tracker.update_state(self_negative_rate(ids, self.queue_ids))
            ids_all = _all_gather_ids(replica, ids) if replica.num_replicas_in_sync > 1 else ids
        else:
            ids_all = tf.fill(tf.shape(keys[0][1])[:1], UNKNOWN_ID)
        self._dequeue_and_enqueue(
            tf.concat([k_all for _, k_all in keys], axis=0), tf.concat([ids_all] * len(keys), axis=0)
        )

        l_pos = tf.concat([s[0] for s in stats], axis=0)
        l_neg = tf.concat([s[1] for s in stats], axis=0)
        self.loss_tracker.update_state(loss)
        self.pos_tracker.update_state(tf.reduce_mean(l_pos))
        self.neg_tracker.update_state(tf.reduce_mean(l_neg))
        # Contrastive top-1: the positive outscores every queue key (index 0 of the logits).
        self.acc_tracker.update_state(tf.reduce_mean(tf.cast(l_pos > tf.reduce_max(l_neg, axis=1), tf.float32)))
        # self_neg only when this data has ids (known while tracing): a 0 would claim none were seen.
        logs = {m.name: m.result() for m in self.metrics if ids is not None or m is not self.self_neg_tracker}
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras reduces multi-worker logs with a mean along axis 0, which a scalar lacks.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    # ----------------------------------------------------------------------------- pieces
    def _momentum_update_key_encoder(self):
        """k = m * k + (1 - m) * q over parameters; BN moving statistics are left alone."""
        pairs = [
            (k.value, q.value)
            for k, q in zip(self.encoder_k.weights, self.encoder_q.weights, strict=True)
            if q.trainable
        ]
        m = self.moco_momentum

        def update(strategy, pairs):
            # Cross-replica context: each device's copy moves towards its own copy of q.
            for key_var, query_var in pairs:
                strategy.extended.update(
                    key_var, lambda k, q: k.assign(m * k + (1.0 - m) * q), args=(query_var,), group=False
                )

        tf.__internal__.distribute.interim.maybe_merge_call(update, tf.distribute.get_strategy(), pairs)

    def _shuffled_keys(self, x_k, salt: int):
        """Keys of x_k under shuffle BN: returns (this replica's keys, all replicas' keys).

        All replicas gather the global key batch, permute it with one shared permutation
        (a stateless draw from the step counter), encode their slice, gather the encoded
        slices and undo the permutation. With one replica the permutation still mixes the
        BN groups (bn_groups > 1), as the official CIFAR demo does on one GPU.
        """
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync
        rid = replica.replica_id_in_sync_group
        local = tf.shape(x_k)[0]

        def gather(x):
            return replica.all_gather(x, axis=0) if replicas > 1 else x

        def mine(x):  # this replica's slice of a global batch, static shape kept
            if replicas == 1:
                return x
            return tf.reshape(x, tf.concat([[replicas, local], tf.shape(x)[1:]], 0))[rid]

        if not self.shuffle_bn:
            k = self._encode_keys(x_k)
            return k, gather(k)
        x_all = gather(x_k)
        perm = key_permutation(tf.shape(x_all)[0], self.optimizer.iterations, salt)
        k_shuffled = gather(self._encode_keys(mine(tf.gather(x_all, perm))))
        k_all = tf.gather(k_shuffled, tf.argsort(perm))  # undo: k_all[perm[i]] = k_shuffled[i]
        return mine(k_all), k_all

    def _encode_keys(self, x):
        keys = self.encoder_k(x, training=True)
        return tf.stop_gradient(tf.math.l2_normalize(tf.cast(keys, self.queue.dtype), axis=1))

    def _dequeue_and_enqueue(self, keys, ids):
        """Overwrite the oldest rows with this step's keys and their image ids (the same on every
        replica: both are all-gathered first)."""
        ptr = tf.cast(self.queue_ptr, tf.int32)
        count = tf.shape(keys)[0]
        rows = (ptr + tf.range(count)) % self.queue_size
        self.queue.assign(tf.tensor_scatter_nd_update(self.queue, rows[:, None], tf.cast(keys, self.queue.dtype)))
        self.queue_ids.assign(tf.tensor_scatter_nd_update(self.queue_ids, rows[:, None], tf.cast(ids, tf.int32)))
        self.queue_ptr.assign((ptr + count) % self.queue_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            arch=self.arch, dim=self.dim, queue_size=self.queue_size, moco_momentum=self.moco_momentum,
            temperature=self.temperature, mlp=self.mlp, shuffle_bn=self.shuffle_bn,
            bn_groups=self.bn_groups, symmetric=self.symmetric, cifar_stem=self.cifar_stem,
            image_size=self.image_size, width=self.width,
            aug=self.aug, blur=self.blur, color_in_step=self.color_in_step,
        )
        return config


UNKNOWN_ID = -1  # a queue row whose image is not known (start, data without ids, an old checkpoint)


def _all_gather_ids(replica, ids: tf.Tensor) -> tf.Tensor:
    # Gathered as float32 (exact for ids below 2**24, 13x ImageNet): MultiWorkerMirroredStrategy's
    # all_gather of int32 fails on CPU workers ("destinations can not be empty").
    return tf.cast(replica.all_gather(tf.cast(ids, tf.float32), axis=0), tf.int32)


def self_negative_rate(ids: tf.Tensor, queue_ids: tf.Tensor) -> tf.Tensor:
    """Share of the queries (image ids [N]) whose own image has a key among the queue's (ids [K]):
    those queries' negatives hold an older view of their positive. Unknown ids (< 0) never match."""
    ids = tf.cast(ids, tf.int32)
    # [N, K] booleans: K * N bytes (65536 x 256 = 16 MiB at most for the official recipes).
    hit = tf.reduce_any(ids[:, None] == tf.cast(queue_ids, tf.int32)[None, :], axis=1) & (ids >= 0)
    return tf.reduce_mean(tf.cast(hit, tf.float32))


def key_permutation(size, step, salt: int = 0) -> tf.Tensor:
    """The shuffle-BN permutation of a global key batch of `size` at optimizer step `step`: a
    stateless draw, so every replica computes the same one without communicating."""
    seed = tf.stack([tf.cast(step, tf.int32), tf.constant(salt, tf.int32)])
    # Raw Philox bits: XLA converts them to floats differently, so sort the integers.
    bits = tf.random.stateless_uniform([size], seed=seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox")
    return tf.argsort(tf.cast(bits, tf.int64), stable=True)


def check_queue_fits(queue_size: int, global_batch_size: int, symmetric: bool = False) -> None:
    """Raises ValueError unless queue_size is a multiple of the keys enqueued per step."""
    keys = global_batch_size * (2 if symmetric else 1)
    if queue_size % keys:
        raise ValueError(
            f"queue_size {queue_size} is not a multiple of the keys enqueued per step "
            f"({keys} = global batch {global_batch_size}{' x 2 (symmetric)' if symmetric else ''})"
        )


def _unpack(data, color_stage: ColorStage | None = None):
    """(x_q, x_k, ids or None) from a `PretrainBatch`, a views tensor [N, 2, H, W, C] or a pair,
    its views coloured by `color_stage` when the model has one."""
    if isinstance(data, (tuple, list)):
        data = [part for part in data if part is not None]  # train_on_batch passes (x, None, None)
        if len(data) == 1:
            data = data[0]
        elif color_stage is None:
            return data[0], data[1], None
        else:
            raise ValueError("a MoCo with color_in_step trains on PretrainBatch dicts (crops and their colour seed)")
    if isinstance(data, dict):
        views, color_seed, ids = data["views"], data.get("color_seed"), data.get("ids")
    else:
        views, color_seed, ids = data, None, None
    if color_stage is not None:
        if color_seed is None:
            raise ValueError("a MoCo with color_in_step needs each batch's color_seed to colour its crops")
        views = color_stage(views, color_seed)
    elif tf.as_dtype(views.dtype) == tf.uint8:
        raise ValueError(
            "the batch holds uint8 crops still to colour (pretrain_dataset(color_in_step=True)): "
            "build MoCo with color_in_step=True"
        )
    return views[:, 0], views[:, 1], ids
