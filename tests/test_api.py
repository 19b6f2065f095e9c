"""The public API imports and every name in __all__ exists."""

import qjax


def test_all_names_exist():
  for name in qjax.__all__:
    assert getattr(qjax, name) is not None, name


def test_subpackages_import():
  from qjax import data, models, sweep, theory, train  # noqa: F401
  assert callable(sweep.sweep) and callable(train.train_step)


def test_readme_codes_example_trains_a_model_stored_as_codes():
  """The README's SR-ADAM-with-codes recipe, on a small Flax model: the
  kernels stay 1-bit codes, the loss falls, the decoded weights are ±0.5."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from qjax import codes

  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
  x = jax.random.normal(jax.random.key(1), (256, 8))
  y = (x[:, 0] > 0).astype(jnp.int32)
  params = model.init(jax.random.key(0), x)["params"]
  grid = qjax.Grid.binary(0.5)
  params = codes.encode_tree(params, qjax.resolve_grids(
      grid, params, qjax.resolve_mask(qjax.all_kernels, params)))
  tx = qjax.skip_nonfinite(optax.chain(
      optax.adam(1e-2), qjax.stochastic_rounding(None, key=0)))
  opt_state = tx.init(codes.decode_tree(params))

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss)(codes.decode_tree(params))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  first = loss(codes.decode_tree(params))
  for _ in range(100):
    params, opt_state = step(params, opt_state)
  kernel = params["layers_0"]["kernel"]
  assert isinstance(kernel, qjax.Codes) and kernel.data.dtype == jnp.uint8
  assert kernel.data.size == 8 * 16 // 8
  assert set(np.unique(np.asarray(codes.decode(kernel))).tolist()) == {
      -0.5, 0.5}
  assert loss(codes.decode_tree(params)) < 0.7 * first
