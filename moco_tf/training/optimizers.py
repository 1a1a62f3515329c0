"""SGD with PyTorch's exact semantics, as the official MoCo code trains with.

`keras.optimizers.SGD` differs twice: its weight decay is decoupled (`w -= lr*wd*w`) where
PyTorch adds `wd*w` to the gradient before momentum, and it keeps the learning rate inside
the momentum buffer (`v = m*v - lr*g`) where PyTorch applies it outside (`w -= lr*buf`); the
two diverge as soon as the learning rate changes.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="moco_tf")
class SGD(keras.optimizers.Optimizer):
    """`torch.optim.SGD(params, lr, momentum, weight_decay)` (no dampening, no Nesterov).

    Per variable: `g = grad + weight_decay * w; buf = momentum * buf + g; w -= lr * buf`,
    with the decay on every variable (biases and BatchNorm included, as the official code).
    """

    def __init__(
        self,
        learning_rate=0.03,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        name: str = "sgd",
        **kwargs,
    ):
        # weight_decay stays out of the base class: it would add Keras's decoupled decay.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum = momentum
        self.coupled_weight_decay = weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # A zero buffer gives PyTorch's first step (buf = g) exactly.
        self.momentum_buffers = [self.add_variable_from_reference(v, name="momentum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        grad = tf.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            grad = grad + tf.cast(self.coupled_weight_decay, variable.dtype) * variable
        buffer = self.momentum_buffers[self._get_variable_index(variable)]
        new_buffer = tf.cast(self.momentum, variable.dtype) * buffer + grad
        self.assign(buffer, new_buffer)
        self.assign_sub(variable, lr * new_buffer)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.coupled_weight_decay)
        return config
