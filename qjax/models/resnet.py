"""Residual networks: CIFAR ResNet-56 / WRN-56-2 and ImageNet ResNet-18.

CIFAR networks follow He et al. 2016 (arXiv 1512.03385, section 4.2): a 3x3 stem
of 16 channels, three stages of ``n = (depth - 2) / 6`` basic blocks at strides
1, 2, 2, global average pooling and a Dense classifier. Shortcut option A
(identity; strided subsampling and zero-padded channels where the shape changes)
has no parameters and gives ResNet-56 853,018 parameters, He et al.'s "0.85M"
(Table 6). Option B (1x1 conv + BN projections where the shape changes) is
available through ``shortcut='B'``. WRN-56-2 is the same network with every
stage twice as wide (32, 64, 128), stem kept at 16.

ResNet-18 follows torchvision's ``resnet18``: 7x7/2 stem, 3x3/2 max pool, four
stages of two basic blocks (64, 128, 256, 512), option B shortcuts;
11,689,512 parameters with 1000 classes.

Convolutions have no bias (BN follows each one), as in both references.
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.models.mlp import (BN_MOMENTUM, PAD_1, batch_norm, conv_init,
                             dense)

SHORTCUTS = ('A', 'B')


def _shortcut_a(x: jax.Array, features: int, stride: int) -> jax.Array:
  """Parameter-free shortcut: subsample by ``stride``, zero-pad channels to
  ``features``."""
  x = x[:, ::stride, ::stride, :]
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
  """``conv3x3, BN, ReLU, conv3x3, BN`` plus shortcut, then ReLU (He et al.
  2016).

  Attributes:
    features: output channels.
    stride: stride of the first convolution and of the shortcut.
    shortcut: 'A' (parameter-free) or 'B' (1x1 conv + BN), used only where the
      shape changes; otherwise the shortcut is the identity.
  """

  features: int
  stride: int = 1
  shortcut: str = 'B'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = lambda stride: nn.Conv(
        self.features, (3, 3), (stride, stride), padding=PAD_1,
        use_bias=False, kernel_init=conv_init)
    y = nn.relu(batch_norm(train)(conv(self.stride)(x)))
    y = batch_norm(train)(conv(1)(y))
    if self.stride == 1 and x.shape[-1] == self.features:
      residual = x
    elif self.shortcut == 'A':
      residual = _shortcut_a(x, self.features, self.stride)
    else:
      residual = nn.Conv(
          self.features, (1, 1), (self.stride, self.stride), use_bias=False,
          kernel_init=conv_init, name='shortcut_conv')(x)
      residual = batch_norm(train, name='shortcut_bn')(residual)
    return nn.relu(y + residual)


def _check_shortcut(shortcut: str) -> None:
  if shortcut not in SHORTCUTS:
    raise ValueError(f'shortcut must be one of {SHORTCUTS}, got {shortcut!r}.')


class CifarResNet(nn.Module):
  """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers, optionally widened.

  Attributes:
    num_classes: number of output logits.
    depth: total weight layers, ``6n + 2`` (20, 32, 44, 56, 110, ...).
    width: multiplier of the stage widths 16, 32, 64 (2 for WRN-56-2).
    shortcut: 'A' (He et al.'s CIFAR choice, parameter-free) or 'B'.
  """

  num_classes: int = 10
  depth: int = 56
  width: int = 1
  shortcut: str = 'A'
  bn_momentum: ClassVar[float] = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(
          f'depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), '
          f'got {self.depth}.')
    _check_shortcut(self.shortcut)
    blocks_per_stage = (self.depth - 2) // 6
    x = nn.Conv(16, (3, 3), padding=PAD_1, use_bias=False,
                kernel_init=conv_init)(x)
    x = nn.relu(batch_norm(train)(x))
    for stage, base in enumerate((16, 32, 64)):
      for block in range(blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
            base * self.width, stride, self.shortcut,
            name=f'stage{stage + 1}_block{block}')(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return dense(self.num_classes)(x)


class ResNet56(CifarResNet):
  """ResNet-56 (He et al. 2016), option A shortcuts; 853,018 parameters for 10
  classes."""


class WRN56_2(CifarResNet):  # pylint: disable=invalid-name
  """WRN-56-2: ResNet-56 with stages of 32, 64, 128 channels; 3,396,698
  parameters for 10 classes."""

  width: int = 2


class ResNet18(nn.Module):
  """torchvision's ImageNet ResNet-18; 11,689,512 parameters for 1000 classes.

  Attributes:
    num_classes: number of output logits.
    shortcut: 'B' as in torchvision (projection where the shape changes), or
      'A'.
  """

  num_classes: int = 1000
  shortcut: str = 'B'
  bn_momentum: ClassVar[float] = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    _check_shortcut(self.shortcut)
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=conv_init)(x)
    x = nn.relu(batch_norm(train)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_1)
    for stage, features in enumerate((64, 128, 256, 512)):
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, stride, self.shortcut,
                       name=f'stage{stage + 1}_block{block}')(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return dense(self.num_classes)(x)
