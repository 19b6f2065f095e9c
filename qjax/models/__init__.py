"""Flax models of the paper's experiments, and a registry to build them by name.

Every model is a ``flax.linen`` module called as
``model.apply(variables, x, train=..., mutable=...)`` on NHWC float32 inputs;
``train`` is keyword-only and required, so that no caller gets BatchNorm's mode
by accident. Models with BatchNorm keep running statistics in ``batch_stats``:
pass ``mutable=['batch_stats']`` when ``train=True``.

Example:
  >>> model = qjax.models.get('resnet56', num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
  ...                        train=False)
  >>> logits, updates = model.apply(variables, x, train=True,
  ...                               mutable=['batch_stats'])
"""

import math
from collections.abc import Callable

import flax.linen as nn
import jax

from qjax.models.allconv import AllConv
from qjax.models.cnn import SmallCNN
from qjax.models.mlp import MLP
from qjax.models.mlp import debiased_batch_stats
from qjax.models.resnet import CifarResNet
from qjax.models.resnet import ResNet18
from qjax.models.resnet import ResNet56
from qjax.models.resnet import WRN56_2
from qjax.models.vgg import VGG
from qjax.models.vgg import VGG9
from qjax.models.vgg import VGGBC

__all__ = [
    'AllConv',
    'CifarResNet',
    'MLP',
    'ResNet18',
    'ResNet56',
    'SmallCNN',
    'VGG',
    'VGG9',
    'VGGBC',
    'WRN56_2',
    'debiased_batch_stats',
    'NAMES',
    'get',
    'param_count',
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    'mlp': MLP,
    'cnn': SmallCNN,
    'allconv': AllConv,
    'vgg9': VGG9,
    'vgg_bc': VGGBC,
    'resnet56': ResNet56,
    'wrn56_2': WRN56_2,
    'resnet18': ResNet18,
}

# The registered model names, for command-line choices.
NAMES = tuple(_REGISTRY)


def get(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the model registered as ``name`` with ``num_classes`` outputs.

  Args:
    name: one of 'mlp', 'cnn', 'allconv', 'vgg9', 'vgg_bc', 'resnet56',
      'wrn56_2', 'resnet18'.
    num_classes: number of output logits.
    **kwargs: further attributes of the model class (e.g. ``features`` for
      'mlp').

  Returns:
    An unbound ``flax.linen`` module.

  Raises:
    ValueError: if ``name`` is not registered.
  """
  if name not in _REGISTRY:
    raise ValueError(
        f'Unknown model {name!r}; known models are {sorted(_REGISTRY)}.')
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


def param_count(params) -> int:
  """Number of scalars in a parameter tree (arrays or
  ``jax.ShapeDtypeStruct`` leaves).

  Pass ``variables['params']``: BatchNorm's scale and bias count, its running
  statistics (``batch_stats``) are not parameters.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
