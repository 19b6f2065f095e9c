"""An all-convolutional net with global average pooling (Table 1 at CPU scale).

The paper binarizes conv kernels only. In a net with a large dense head (the
small CNN here: conv kernels are 4 % of its parameters) that leaves almost all
weights in float32, and the methods cannot be told apart. In this net nearly
every parameter is a conv kernel: a VGG-style stack of ``3x3 conv, BN, ReLU``
with 2x2 max pooling, global average pooling, and one small Dense classifier
(kept in float32 under ``mask='conv'``, as the paper keeps its classifier).

With the default ``conv_spec`` ``(32, 32, 'M', 64, 64, 'M', 128)`` on a
1-channel input, the conv kernels hold 138,528 of the 140,778 parameters
(98.4 %; the classifier 1,290, conv biases 320, BatchNorm 640): see
``tests/test_models.py``.
"""

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax

from qjax.models.mlp import (BN_MOMENTUM, PAD_1, batch_norm, conv_init,
                             dense, max_pool_2x2)

POOL = 'M'


class AllConv(nn.Module):
  """``3x3 conv, BN, ReLU`` blocks (``'M'``: 2x2 max pool), global average
  pooling, ``Dense(num_classes)``.

  Attributes:
    num_classes: number of output logits.
    conv_spec: conv output channels in order; ``'M'`` inserts a 2x2 max pool.
  """

  num_classes: int = 10
  conv_spec: Sequence[int | str] = (32, 32, POOL, 64, 64, POOL, 128)
  bn_momentum: ClassVar[float] = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for item in self.conv_spec:
      if item == POOL:
        x = max_pool_2x2(x)
      else:
        x = nn.Conv(int(item), (3, 3), padding=PAD_1, kernel_init=conv_init)(x)
        x = nn.relu(batch_norm(train)(x))
    x = x.mean(axis=(1, 2))
    return dense(self.num_classes)(x)
