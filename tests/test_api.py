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


def test_readme_registry_example_registers_a_method_that_trains():
  """The README's ``sr_half`` block, executed as written, then trained
  through the engine on a few digits (the registry promise)."""
  import pathlib
  import re

  import numpy as np

  from qjax import data, models
  from qjax.sweep import SweepSpec, sweep
  from qjax.train import TrainConfig

  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md"
            ).read_text()
  block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "register(\"sr_half\"" in b)
  try:
    exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
    assert "sr_half" in qjax.methods.names()
    ds = data.load("digits")
    ds = ds._replace(train_x=ds.train_x[:512], train_y=ds.train_y[:512])
    out = sweep(models.get("mlp", 10, features=(32,)), ds,
                TrainConfig(method="sr_half", batch_size=64, epochs=2),
                SweepSpec(seeds=(0,), lrs=(0.01,)), progress=False)
    assert out["history"][-1]["test_error"][0] < 0.6  # chance: 0.9
    kernels = [v for v in qjax.codes.decode_tree(out["final_state"].params)
               ["Dense_0"].values() if v.ndim == 3]
    assert kernels and np.unique(kernels[0]).size == 2  # stored as ±H codes
  finally:
    if "sr_half" in qjax.methods.names():
      qjax.methods.unregister("sr_half")
