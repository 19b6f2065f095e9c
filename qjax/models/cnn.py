"""A small convnet for 28x28x1 data (MNIST, Fashion-MNIST)."""

from typing import ClassVar

import flax.linen as nn
import jax

from qjax.models.mlp import (BN_MOMENTUM, PAD_1, batch_norm, conv_init,
                             dense, max_pool_2x2)


class SmallCNN(nn.Module):
  """Two conv blocks and a dense head.

  Architecture: ``[3x3 conv(32), BN, ReLU, 2x2 max pool]``,
  ``[3x3 conv(64), BN, ReLU, 2x2 max pool]``, ``Dense(hidden), BN, ReLU``,
  ``Dense(num_classes)``. A 28x28 input becomes 7x7x64 before the head.

  Attributes:
    num_classes: number of output logits.
    features: output channels of the two conv blocks.
    hidden: width of the dense hidden layer.
  """

  num_classes: int = 10
  features: tuple[int, ...] = (32, 64)
  hidden: int = 128
  bn_momentum: ClassVar[float] = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for width in self.features:
      x = nn.Conv(width, (3, 3), padding=PAD_1, kernel_init=conv_init)(x)
      x = nn.relu(batch_norm(train)(x))
      x = max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(batch_norm(train)(dense(self.hidden)(x)))
    return dense(self.num_classes)(x)
