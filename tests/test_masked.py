"""qjax rules compose with optax's masking idiom (``qjax.masked``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax
from qjax import codes
from qjax import grid as grid_lib

GRID = qjax.Grid.binary(0.5)


def _params():
  return {"l1": {"kernel": jnp.full((4, 3), 0.3), "bias": jnp.zeros(3)},
          "l2": {"kernel": jnp.full((3, 2), -0.2)}}


def _first_layer(path, leaf):
  del leaf
  return path[0] == "l1"


def _tx():
  return optax.chain(optax.adam(0.1), qjax.masked(
      qjax.stochastic_rounding(GRID, 0, mask=qjax.all_floats), _first_layer))


def _check(new, adam_only):
  points = set(grid_lib.values(GRID).tolist())
  for leaf in jax.tree.leaves(new["l1"]):  # selected: on the grid
    assert set(np.unique(np.asarray(leaf)).tolist()) <= points
  # Unselected: exactly Adam's step, no rounding.
  np.testing.assert_array_equal(np.asarray(new["l2"]["kernel"]),
                                np.asarray(adam_only["l2"]["kernel"]))


def test_masked_rounds_selected_float_leaves_only():
  params, tx = _params(), _tx()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  adam = optax.adam(0.1)
  adam_updates, _ = jax.jit(adam.update)(grads, adam.init(params), params)
  _check(optax.apply_updates(params, updates),
         optax.apply_updates(params, adam_updates))


def test_masked_works_on_codes():
  params, tx = _params(), _tx()
  selected = qjax.resolve_mask(_first_layer, params)
  stored = codes.encode_tree(params, qjax.resolve_grids(GRID, params,
                                                        selected))
  assert codes.is_codes(stored["l1"]["kernel"])
  assert not codes.is_codes(stored["l2"]["kernel"])
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(codes.decode_tree(stored))
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, stored)
    stored = optax.apply_updates(stored, updates)
  assert codes.is_codes(stored["l1"]["kernel"])
  decoded = codes.decode_tree(stored)
  assert set(np.unique(np.asarray(decoded["l1"]["kernel"])).tolist()) <= {
      -0.5, 0.5}
  # Gradients of +1 push every weight down: after 3 Adam steps of 0.1 the
  # unselected kernel is -0.2 - 0.3 (to float32 rounding), never rounded.
  np.testing.assert_allclose(np.asarray(decoded["l2"]["kernel"]), -0.5,
                             atol=1e-5)
