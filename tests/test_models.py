"""Tests of qjax.models: published parameter counts, forward passes, BatchNorm
modes, and the naming contract that quantization masks rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax.models
from qjax.models import AllConv
from qjax.models import CifarResNet
from qjax.models import MLP
from qjax.models import ResNet18
from qjax.models import ResNet56
from qjax.models import SmallCNN
from qjax.models import VGG9
from qjax.models import VGGBC
from qjax.models import WRN56_2
from qjax.models import get
from qjax.models import param_count

CIFAR = (2, 32, 32, 3)
IMAGENET = (2, 224, 224, 3)
MNIST = (2, 28, 28, 1)
NAMES = ('mlp', 'cnn', 'allconv', 'vgg9', 'vgg_bc', 'resnet56', 'wrn56_2',
         'resnet18')
INPUT_SHAPES = {'mlp': MNIST, 'cnn': MNIST, 'allconv': MNIST,
                'resnet18': IMAGENET}


def _abstract_variables(model, shape):
  """Shapes of ``model``'s variables, without computing anything."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)


def _conv(c_in, c_out, k=3, bias=False):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _dense(n_in, n_out):
  return n_in * n_out + n_out


def _bn(c):
  return 2 * c  # scale and bias; running mean and variance are batch_stats


def _cifar_resnet_count(n, widths, num_classes=10, stem=16):
  """Basic-block CIFAR ResNet, option A shortcuts (no shortcut parameters)."""
  total = _conv(3, stem) + _bn(stem)
  c_in = stem
  for width in widths:
    total += _conv(c_in, width) + _bn(width) + _conv(width, width) + _bn(width)
    total += (n - 1) * 2 * (_conv(width, width) + _bn(width))
    c_in = width
  return total + _dense(c_in, num_classes)


def _vgg_count(conv_widths, flat, hidden, num_classes=10):
  """VGG with biased convs and dense layers, BN after every hidden layer."""
  total, c_in = 0, 3
  for width in conv_widths:
    total += _conv(c_in, width, bias=True) + _bn(width)
    c_in = width
  for width in hidden:
    total += _dense(flat, width) + _bn(width)
    flat = width
  return total + _dense(flat, num_classes)


# ResNet-56: 6n+2 with n = 9; 432+32 stem, 42,048 + 162,432 + 647,424 in the
# three stages, 650 in the classifier.
RESNET56 = _cifar_resnet_count(9, (16, 32, 64))
# WRN-56-2: stages twice as wide, stem unchanged (16): 464 + 162,432 + 647,424
# + 2,585,088 + 1,290.
WRN56_2_COUNT = _cifar_resnet_count(9, (32, 64, 128))
# VGG-9 (loss-landscape cifar10/models/vgg.py): convs 64,64,128,128,256,256,256,
# three pools leave 4x4x256 = 4096 features, one hidden Dense of 256.
VGG9_COUNT = _vgg_count((64, 64, 128, 128, 256, 256, 256), 4 * 4 * 256, (256,))
# VGG-BC (BinaryConnect): convs 128,128,256,256,512,512, three pools leave
# 4x4x512 = 8192 features, two hidden Dense layers of 1024.
VGGBC_COUNT = _vgg_count((128, 128, 256, 256, 512, 512), 4 * 4 * 512,
                         (1024, 1024))


def test_hand_derived_counts_are_as_documented():
  assert RESNET56 == 853_018
  assert WRN56_2_COUNT == 3_396_698
  assert VGG9_COUNT == 2_789_706
  assert VGGBC_COUNT == 14_033_546


@pytest.mark.parametrize('model, shape, expected', [
    # torchvision.models.resnet18().parameters(): 11,689,512.
    (ResNet18(num_classes=1000), IMAGENET, 11_689_512),
    (ResNet56(num_classes=10), CIFAR, RESNET56),
    (WRN56_2(num_classes=10), CIFAR, WRN56_2_COUNT),
    (VGG9(num_classes=10), CIFAR, VGG9_COUNT),
    (VGGBC(num_classes=10), CIFAR, VGGBC_COUNT),
], ids=['resnet18', 'resnet56', 'wrn56_2', 'vgg9', 'vgg_bc'])
def test_param_count_matches_reference(model, shape, expected):
  variables = _abstract_variables(model, shape)
  assert param_count(variables['params']) == expected


def test_resnet56_matches_he_et_al_table_6():
  # He et al. 2016, Table 6: ResNet-56 has 0.85M parameters.
  count = param_count(_abstract_variables(ResNet56(), CIFAR)['params'])
  assert abs(count - 0.85e6) / 0.85e6 < 0.01


def test_resnet18_option_a_drops_the_projection_parameters():
  # Three 1x1 projections with BN: 64->128, 128->256, 256->512.
  projections = sum(_conv(c, 2 * c, k=1) + _bn(2 * c) for c in (64, 128, 256))
  count = param_count(
      _abstract_variables(ResNet18(shortcut='A'), IMAGENET)['params'])
  assert count == 11_689_512 - projections


def test_resnet18_logits_shape_at_imagenet_resolution():
  model = ResNet18(num_classes=1000)
  variables = _abstract_variables(model, IMAGENET)
  x = jax.ShapeDtypeStruct(IMAGENET, jnp.float32)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                          variables, x)
  assert logits.shape == (2, 1000)


@pytest.mark.parametrize('name, n_conv, n_dense', [
    ('mlp', 0, 4),
    ('cnn', 2, 2),
    ('allconv', 5, 1),
    ('vgg9', 7, 2),
    ('vgg_bc', 6, 3),
    ('resnet56', 55, 1),
    ('wrn56_2', 55, 1),
    ('resnet18', 20, 1),  # 17 3x3/7x7 convs and 3 1x1 projections
])
def test_kernels_are_named_kernel_and_ranked_by_layer_type(name, n_conv,
                                                           n_dense):
  model = get(name, num_classes=10)
  params = _abstract_variables(model, INPUT_SHAPES.get(name, CIFAR))['params']
  leaves = jax.tree_util.tree_leaves_with_path(params)
  kernel_ranks = [leaf.ndim for path, leaf in leaves
                  if path[-1].key == 'kernel']
  assert all(leaf.ndim <= 2 for path, leaf in leaves
             if path[-1].key != 'kernel')
  assert kernel_ranks.count(4) == n_conv
  assert kernel_ranks.count(2) == n_dense
  assert len(kernel_ranks) == n_conv + n_dense


@pytest.mark.parametrize('name', NAMES)
def test_registry_builds_every_model_with_num_classes(name):
  model = get(name, num_classes=7)
  x = jax.ShapeDtypeStruct(INPUT_SHAPES.get(name, CIFAR), jnp.float32)
  variables = _abstract_variables(model, x.shape)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                          variables, x)
  assert logits.shape == (2, 7)


def test_registry_passes_kwargs_through():
  model = get('mlp', num_classes=3, features=(5,), use_bn=False)
  assert model == MLP(num_classes=3, features=(5,), use_bn=False)


def test_registry_rejects_unknown_names_and_lists_known_ones():
  with pytest.raises(ValueError, match='resnet56') as info:
    get('resnet57', num_classes=10)
  for name in NAMES:
    assert name in str(info.value)


def test_public_api_is_importable():
  for name in qjax.models.__all__:
    assert hasattr(qjax.models, name)


def test_cifar_resnet_rejects_bad_depth_and_shortcut():
  with pytest.raises(ValueError, match='6n \\+ 2'):
    _abstract_variables(CifarResNet(depth=51), CIFAR)
  with pytest.raises(ValueError, match="'C'"):
    _abstract_variables(CifarResNet(depth=20, shortcut='C'), CIFAR)


def test_mlp_without_batchnorm_has_no_batch_stats():
  variables = _abstract_variables(MLP(features=(8,), use_bn=False), MNIST)
  assert 'batch_stats' not in variables
  assert param_count(variables['params']) == _dense(784, 8) + _dense(8, 10)


def _numpy_variables(model, shape, seed=0):
  """Random variables of ``model``'s shapes drawn by NumPy.

  Compiling ResNet-56's ``init`` takes 10-30 s on XLA:CPU (its per-leaf random
  draws); the forward tests only need some finite weights. Kernels are
  He-normal, 1-D parameters small normal, batch statistics at their initial
  mean 0, var 1.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[0].key == 'batch_stats':
      return jnp.full(leaf.shape, path[-1].key == 'var', jnp.float32)
    fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 200.0
    return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in),
                       jnp.float32)

  return jax.tree_util.tree_map_with_path(fill,
                                          _abstract_variables(model, shape))


def test_init_gives_the_abstract_shapes_and_finite_values():
  model = SmallCNN()
  # rbg compiles several times faster than threefry.
  key = jax.random.key(0, impl='rbg')
  variables = jax.jit(lambda x: model.init(key, x, train=False))(
      jnp.zeros(MNIST))
  expected = _abstract_variables(model, MNIST)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, expected)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(variables))


@pytest.fixture(scope='module', params=[
    (MLP(features=(32, 16)), MNIST),
    (SmallCNN(), MNIST),
    (ResNet56(), CIFAR),
], ids=['mlp', 'cnn', 'resnet56'])
def model_setup(request):
  """Variables of a model, its input and its apply; shared by the forward
  tests."""
  model, shape = request.param
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  # Eager: cheaper than compiling both modes for the few calls the tests make.
  apply = lambda v, x, train: model.apply(v, x, train=train,
                                          mutable=['batch_stats'])
  return _numpy_variables(model, shape), x, apply


def test_forward_shapes_in_both_modes(model_setup):
  variables, x, apply = model_setup
  for train in (True, False):
    logits, _ = apply(variables, x, train=train)
    assert logits.shape == (x.shape[0], 10)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_train_mode_updates_batch_stats(model_setup):
  variables, x, apply = model_setup
  _, updates = apply(variables, x, train=True)
  old = jax.tree.leaves(variables['batch_stats'])
  new = jax.tree.leaves(updates['batch_stats'])
  assert all(not np.array_equal(a, b) for a, b in zip(old, new))


def test_eval_mode_keeps_batch_stats_and_is_deterministic(model_setup):
  variables, x, apply = model_setup
  logits, updates = apply(variables, x, train=False)
  again, _ = apply(variables, x, train=False)
  unchanged = jax.tree.map(np.array_equal, updates['batch_stats'],
                           variables['batch_stats'])
  assert all(jax.tree.leaves(unchanged))
  np.testing.assert_array_equal(logits, again)


def test_train_and_eval_modes_normalize_differently(model_setup):
  variables, x, apply = model_setup
  train_logits, _ = apply(variables, x, train=True)
  eval_logits, _ = apply(variables, x, train=False)
  assert not np.allclose(train_logits, eval_logits)


def test_train_is_required():
  model = SmallCNN()
  with pytest.raises(TypeError, match='train'):
    model.init(jax.random.key(0), jnp.zeros(MNIST))


def test_debiased_stats_reproduce_the_batch_after_a_few_steps(model_setup):
  """Trained t times on one batch, the running statistics debiased for t steps
  are that batch's statistics: evaluation gives the training-mode logits.
  Flax's raw statistics still hold momentum**t of their initial values."""
  variables, x, apply = model_setup
  steps = 3
  for _ in range(steps):
    train_logits, updates = apply(variables, x, train=True)
    variables = dict(variables, batch_stats=updates['batch_stats'])
  model_bn = dict(variables, batch_stats=qjax.models.debiased_batch_stats(
      variables['batch_stats'], steps))
  debiased_logits, _ = apply(model_bn, x, train=False)
  raw_logits, _ = apply(variables, x, train=False)
  # Not exact: the initial variance 1 is subtracted again in float32, which
  # costs ~1e-7 of absolute variance, against epsilon 1e-5 (a batch of 2 has
  # features of almost zero variance).
  scale = np.abs(train_logits).max()
  np.testing.assert_allclose(debiased_logits, train_logits, atol=5e-3 * scale)
  assert np.abs(raw_logits - train_logits).max() > 0.1 * scale


def test_debiasing_changes_nothing_after_long_runs_or_before_any_step():
  rng = np.random.default_rng(0)
  stats = {'BatchNorm_0': {
               'mean': jnp.asarray(rng.normal(size=64), jnp.float32),
               'var': jnp.asarray(rng.uniform(1e-3, 2.0, 64), jnp.float32)},
           'Block_0': {'BatchNorm_0': {'mean': jnp.zeros(8),
                                       'var': jnp.ones(8)}}}
  for steps in (0, 300, 10_000):
    same = qjax.models.debiased_batch_stats(stats,
                                            jnp.asarray(steps, jnp.int32))
    assert jax.tree.all(jax.tree.map(np.array_equal, same, stats))
  moved = qjax.models.debiased_batch_stats(stats, 12)
  # Initial statistics (mean 0, var 1) debiased after 12 steps: 0 and 1 again.
  np.testing.assert_allclose(moved['Block_0']['BatchNorm_0']['var'], 1.0,
                             rtol=1e-6)
  assert not np.allclose(moved['BatchNorm_0']['var'],
                         stats['BatchNorm_0']['var'])


def test_every_model_declares_its_batchnorm_momentum():
  from qjax.models.mlp import BN_MOMENTUM
  for name in NAMES:
    assert get(name, num_classes=10).bn_momentum == BN_MOMENTUM


def test_debiasing_accepts_frozen_dicts():
  from flax.core import FrozenDict
  stats = FrozenDict({'BatchNorm_0': {'mean': jnp.full(4, 0.5),
                                      'var': jnp.ones(4)}})
  out = qjax.models.debiased_batch_stats(stats, 5)
  np.testing.assert_allclose(out['BatchNorm_0']['mean'], 0.5 / (1 - 0.9**5),
                             rtol=1e-6)
  np.testing.assert_allclose(out['BatchNorm_0']['var'], 1.0, rtol=1e-6)


def _allconv_count(widths, c_in=1, num_classes=10):
  """Biased 3x3 convs with BN, then global average pooling and a Dense."""
  total = 0
  for width in widths:
    total += _conv(c_in, width, bias=True) + _bn(width)
    c_in = width
  return total + _dense(c_in, num_classes)


@pytest.mark.parametrize('spec, shape', [
    ((32, 32, 'M', 64, 64, 'M', 128), MNIST),      # the default
    ((16, 'M', 32, 'M', 64), (2, 14, 14, 1)),      # Table 1 at CPU scale
    ((16, 'M', 32, 'M', 64), (2, 8, 8, 1)),        # the 8x8 digits
])
def test_allconv_conv_kernels_are_over_90_percent_of_its_parameters(spec,
                                                                    shape):
  widths = [w for w in spec if w != 'M']
  model = AllConv(conv_spec=spec)
  params = _abstract_variables(model, shape)['params']
  assert param_count(params) == _allconv_count(widths)
  conv = sum(_conv(c_in, c_out) for c_in, c_out in zip([1] + widths, widths))
  kernels = [leaf for path, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]
             if path[-1].key == 'kernel' and leaf.ndim == 4]
  assert sum(int(np.prod(k.shape)) for k in kernels) == conv
  assert conv / param_count(params) >= 0.9
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = _abstract_variables(model, shape)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                          variables, x)
  assert logits.shape == (2, 10)


def test_allconv_default_count_is_as_documented():
  assert _allconv_count((32, 32, 64, 64, 128)) == 140_778
  assert sum(_conv(a, b) for a, b in zip((1, 32, 32, 64, 64),
                                         (32, 32, 64, 64, 128))) == 138_528
