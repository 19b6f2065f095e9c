"""VGG-style CIFAR networks of the paper: VGG-9 and VGG-BC.

Both are stacks of ``3x3 conv, BN, ReLU`` with 2x2 max pooling, followed by
``Dense, BN, ReLU`` hidden layers and a plain Dense output layer. Conv and Dense
layers carry biases, as in the reference implementations below (PyTorch
``nn.Conv2d`` and Lasagne layers both default to a bias).

VGG-9 follows ``cifar10/models/vgg.py`` of
github.com/tomgoldstein/loss-landscape (Li, Xu, Taylor, Studer, Goldstein 2018,
the same group as the quantized-nets paper): 7 conv layers
``64, 64, M, 128, 128, M, 256, 256, 256, M``, one hidden Dense layer of 256
units, and the classifier: 9 weight layers.

VGG-BC is BinaryConnect's CIFAR-10 network (Courbariaux, Bengio, David 2015):
``2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10``. BinaryConnect also
batch-normalized its output layer and trained it with a squared hinge loss; here
the output is plain logits so that every model shares one loss.
"""

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax

from qjax.models.mlp import (BN_MOMENTUM, PAD_1, batch_norm, conv_init,
                             dense, max_pool_2x2)

POOL = 'M'


class VGG(nn.Module):
  """Generic VGG: ``conv_spec`` lists conv widths, with ``'M'`` for a 2x2 max
  pool.

  Attributes:
    num_classes: number of output logits.
    conv_spec: conv output channels in order; ``'M'`` inserts a 2x2 max pool.
    hidden: widths of the hidden Dense layers (each followed by BN and ReLU).
  """

  num_classes: int = 10
  conv_spec: Sequence[int | str] = ()
  hidden: Sequence[int] = ()
  bn_momentum: ClassVar[float] = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for item in self.conv_spec:
      if item == POOL:
        x = max_pool_2x2(x)
      else:
        x = nn.Conv(item, (3, 3), padding=PAD_1, kernel_init=conv_init)(x)
        x = nn.relu(batch_norm(train)(x))
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(batch_norm(train)(dense(width)(x)))
    return dense(self.num_classes)(x)


class VGG9(VGG):
  """VGG-9 of Li et al. (loss-landscape repository); 2,789,706 parameters for
  10 classes."""

  conv_spec: Sequence[int | str] = (64, 64, POOL, 128, 128, POOL, 256, 256,
                                    256, POOL)
  hidden: Sequence[int] = (256,)


class VGGBC(VGG):
  """BinaryConnect's CIFAR-10 VGG; 14,033,546 parameters for 10 classes."""

  conv_spec: Sequence[int | str] = (128, 128, POOL, 256, 256, POOL, 512, 512,
                                    POOL)
  hidden: Sequence[int] = (1024, 1024)
