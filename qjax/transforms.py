"""Optax transformations that implement the paper's quantized update rules.

Each is the *last* link of an optax chain and needs ``params``:

* :func:`stochastic_rounding` (SR, Li et al. 2017 Eq. 3):
  ``w <- Q_s(w + u)`` where ``u`` is the incoming update (``-α g`` for SGD).
* :func:`nearest_rounding` (R, Eq. 2): ``w <- Q_d(w + u)``.
* :func:`latent_clipping` (BC, Eq. 5): ``w_r <- clip(w_r + u)`` on the float
  latent weights; the forward pass sees ``Q(w_r)`` (see :mod:`qjax.methods`).

:func:`skip_nonfinite` wraps a whole chain so that a step with a NaN or inf
changes nothing (every method of :mod:`qjax.methods` is wrapped in it).

Stored codes. SR and R work on parameters stored as :class:`qjax.codes.Codes`
(how :mod:`qjax.methods` stores them): the base optimizer sees float gradients
of the decoded weights (:func:`qjax.codes.decode_tree`) and keeps its state in
float; the rule turns each float update into new codes, decided from the
current code and the update (:class:`qjax.grid.Points`), and emits the byte
difference modulo 256, which ``optax.apply_updates`` adds back exactly. No
float copy of the weights exists anywhere. Initialise the chain on the
decoded view, ``tx.init(qjax.codes.decode_tree(params))``, or wrap the base
optimizer in :func:`decoded` when it reads the parameters (weight decay).

Float parameters. Passed plain float leaves, SR and R round onto the same
stored points and emit ``δ`` with ``p + δ`` equal to the rounded value
(:func:`exact_delta`); that holds whenever such a float ``δ`` exists, which
is not always: on a 0.1 grid, -0.1 -> 0.2 lands on 0.20000002 in float32
(in a measured run 18 % of the moves on ``kbit(3, 0.7)``). Binary, ternary
and power-of-two-step grids are always exact. Use codes when the stored
values must be exact in every case (unbounded grids can only be floats).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax import codes as codes_lib
from qjax import formats
from qjax import grid as grid_lib
from qjax import quantizers
from qjax.formats import FloatGrid
from qjax.grid import Grid

PyTree = Any


def _corrected(p, q, delta):
  """``delta`` after two residual corrections towards ``p + delta == q``."""
  for _ in range(2):
    delta = jnp.where(p + delta == q, delta, delta + (q - (p + delta)))
  return delta


def exact_delta(p: jax.Array, q: jax.Array) -> jax.Array:
  """Returns ``δ`` (dtype of ``p``) with ``p + δ == q`` in floating point.

  ``q - p`` is off by at most an ulp; each correction step adds the residual
  ``q - (p + δ)`` (exact by Sterbenz's lemma once ``p + δ`` is near ``q``),
  and a final ``nextafter`` nudge settles the rare ties.
  """
  q = q.astype(p.dtype)
  delta = _corrected(p, q, q - p)
  for _ in range(2):
    towards = jnp.where(p + delta < q, jnp.inf, -jnp.inf).astype(p.dtype)
    delta = jnp.where(p + delta == q, delta, jnp.nextafter(delta, towards))
  return delta


def _require_params(params, name: str) -> None:
  if params is None:
    raise ValueError(
        f"{name} needs the current parameters: call "
        f"tx.update(updates, state, params). It must be the last link of an "
        "optax chain, after the optimizer (e.g. optax.chain(optax.adam(lr), "
        f"qjax.{name}(...))).")


def _check_grid(grid, name: str) -> None:
  if not (grid is None or isinstance(grid, (Grid, FloatGrid))
          or callable(grid)):
    raise TypeError(
        f"{name}: grid must be a qjax.Grid, a qjax.FloatGrid, a callable "
        f"(path, leaf) -> Grid, or None (parameters stored as codes carry "
        f"their grid); got {grid!r}.")


def _round_codes(p: codes_lib.Codes, u, bits, rule: str):
  """New codes of ``p`` after update ``u``: the rule decided in code space."""
  points = grid_lib.Points(p.grid, p.dtype)
  k = codes_lib.unpack(p)
  u32 = jnp.asarray(u).astype(jnp.float32)
  if rule == "sr":
    k_new = points.step_stochastic(bits, k, u32)
  else:
    k_new = points.step_nearest(k, u32)
  new = codes_lib.from_indices(k_new, p.grid, p.dtype,
                               batch_ndim=len(p.batch_shape))
  return codes_lib.update(p, new)


def _round_format(p, u, g: FloatGrid, bits, rule: str):
  """Float32 δ with ``p + δ`` = the rule's result, ``p`` stored in ``g``.

  ``p``'s bits are its index (:class:`qjax.formats.FormatPoints`); the new
  index is the R or SR step from it. ``p32 + δ == q`` in float32 (so the
  narrowing in :func:`qjax.apply_updates` is exact) whenever ``q - p`` is
  a float32 number, i.e. unless the weight shrinks by more than ``2**(23 -
  m)`` in one step (then ``p + δ`` is within half a float32 ulp of ``p``
  of ``q``). A non-finite update gives NaN.
  """
  if p.dtype != g.dtype:
    raise ValueError(
        f"{'stochastic_rounding' if rule == 'sr' else 'nearest_rounding'}"
        f"({g!r}) updates parameters stored in {g.dtype.name}; got a leaf "
        f"of dtype {p.dtype} (shape {p.shape}). Store it in the format "
        f"first: qjax.formats.cast(params, jnp.{g.dtype.name}) (no float32 "
        "copy is kept), or use a qjax.Grid for float32 weights.")
  points = formats.FormatPoints(g)
  k = points.index(p)
  u32 = jnp.asarray(u).astype(jnp.float32)
  if rule == "sr":
    k_new = points.step_stochastic(bits, k, u32)
  else:
    k_new = points.step_nearest(k, u32)
  p32 = p.astype(jnp.float32)
  delta = exact_delta(p32, points.value(k_new))
  return jnp.where(finite_entries(u32), delta, jnp.nan)


def finite_entries(x) -> jax.Array:
  """Elementwise ``isfinite`` (``x * 0 == 0``, fused with its producer)."""
  x = jnp.asarray(x)
  return x * jnp.zeros((), x.dtype) == 0


def _round_float(p, u, g, bits, rule: str):
  """δ with ``p + δ`` = the rule's result, for a float parameter ``p``.

  A ``p`` on one of the stored points moves as its code would; any other
  ``p`` is rounded from ``p + u`` (computed in float32).
  """
  if isinstance(g, FloatGrid):
    return _round_format(p, u, g, bits, rule)
  points = grid_lib.Points(g, p.dtype)
  p32 = grid_lib.as_float32(p, "rounding")
  u32 = jnp.asarray(u).astype(jnp.float32)
  k = points.nearest(p32)
  on_grid = points.value(k) == p32
  x = p32 + u32
  if rule == "sr":
    k_new = jnp.where(on_grid, points.step_stochastic(bits, k, u32),
                      points.stochastic(bits, x))
  else:
    k_new = jnp.where(on_grid, points.step_nearest(k, u32),
                      points.nearest(x))
  q = points.value(points.clip(k_new)).astype(p.dtype)
  q = jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, p.dtype), q)
  return exact_delta(p, q)


def _rounding_update(updates, params, mask, grid, key, rule: str,
                     source: str = "threefry"):
  """Shared body of SR and R on every masked (or :class:`Codes`) leaf."""
  is_codes = codes_lib.is_codes
  # Codes leaves are rounded whatever the mask says (their updates can only
  # be code steps); float leaves only where the mask selects them.
  mask, selected = quantizers.resolve_mask_and_codes(mask, params)
  grids = (jax.tree.map(lambda _: None, params, is_leaf=is_codes)
           if grid is None else quantizers.resolve_grids(grid, params, mask))

  def round_leaf(k, p, g, u):
    shape = (tuple(p.batch_shape) + p.shape) if is_codes(p) else p.shape
    if is_codes(u) or jnp.shape(u) != shape:
      got = ("a Codes" if is_codes(u) else
             f"an update of shape {jnp.shape(u)} (dtype "
             f"{getattr(u, 'dtype', type(u).__name__)})")
      raise ValueError(
          f"{'stochastic_rounding' if rule == 'sr' else 'nearest_rounding'}: "
          f"the update of a quantized leaf must be a float array of its "
          f"decoded shape {shape}; got {got}. Compute gradients at the "
          "decoded view, qjax.codes.decode_tree(params).")
    bits = None if k is None else quantizers.random_bits(k, shape, source)
    if is_codes(p):
      return _round_codes(p, u, bits, rule)
    if g is None:
      raise ValueError(
          "the mask selects a float leaf but no grid was given; pass grid= "
          "(a qjax.Grid or (path, leaf) -> Grid), or store the leaf as codes "
          "(qjax.codes.encode_tree).")
    return _round_float(p, u, g, bits, rule)

  return quantizers.map_masked(round_leaf, params, selected, grids, key,
                               updates=updates)


def decoded(inner: optax.GradientTransformation
            ) -> optax.GradientTransformationExtraArgs:
  """``inner`` run on the decoded parameters (codes as their float values).

  For a base optimizer that reads the parameters (e.g.
  ``optax.add_decayed_weights``, ``optax.adamw``) in a chain whose last link
  stores codes: ``optax.chain(qjax.decoded(optax.adamw(lr)),
  qjax.stochastic_rounding(grid, key))``. ``init`` and ``update`` pass
  :func:`qjax.codes.decode_tree` of ``params`` on; the state is float.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(codes_lib.decode_tree(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      params = codes_lib.decode_tree(params)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`: the key for the next draw."""
  key: jax.Array


_VMAP_TRANSFORM = (
    "build one transformation per key inside jax.vmap, e.g. "
    "jax.vmap(lambda k, p: qjax.stochastic_rounding(grid, k).init(p))"
    "(keys, params)")


def stochastic_rounding(grid, key, mask=None, *,
                        random_bits: str = "threefry"
                        ) -> optax.GradientTransformationExtraArgs:
  """SR update rule: after ``apply_updates``, ``w = Q_s(w + u)``.

  Exact for leaves stored as codes. For plain float leaves the rounded value
  is reached only when some float ``δ`` has ``p + δ == q``: always for
  binary and ternary grids and power-of-two steps, not always otherwise
  (e.g. -0.1 -> 0.2 on a 0.1 grid lands on 0.20000002 in float32; such a
  weight is then off the grid). Store quantized leaves as codes
  (:func:`qjax.codes.encode_tree`) when that matters.

  Leaves stored as :class:`qjax.codes.Codes` get new codes on their own grid
  (exact integer updates; an update below one gap moves a weight with
  probability ``|u| / gap`` computed from ``u`` itself, so the rounding is
  unbiased with respect to the stored points even for updates far below an
  ulp of the weight). Masked float leaves are rounded onto ``grid``'s stored
  points in their dtype. Each element uses 32 random bits.

  Args:
    grid: a :class:`~qjax.Grid`, ``(path, leaf) -> Grid``, or ``None`` when
      every quantized leaf is stored as codes (they carry their grid).
    key: int seed (Python or numpy) or one ``jax.random`` key (typed, or raw
      ``uint32[2]``); kept in the state and split on every update, so two
      runs from the same key are bit-identical. A batch of keys is an error
      here: vmap over the keys instead. ``None`` builds a transformation
      that can update an existing state (the key lives there) but whose
      ``init`` raises.
    mask: which leaves to round (see :func:`qjax.resolve_mask`; default: the
      kernels); others get the incoming update unchanged. A mask that
      selects nothing is an error.
    random_bits: where each element's 32 bits come from: ``"threefry"``
      (the default, ``jax.random.bits``' stream) or ``"hash"``
      (:func:`qjax.quantizers.hash_bits`: a keyed integer hash, cheaper on
      CPU; other numbers than the default).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  Example:
    >>> tx = optax.chain(optax.adam(1e-2),
    ...                  qjax.stochastic_rounding(qjax.Grid.binary(), key=0))
  """
  _check_grid(grid, "stochastic_rounding")
  source = quantizers.check_random_bits(random_bits, "stochastic_rounding")
  if key is not None:
    key = quantizers.as_key(key, "stochastic_rounding", _VMAP_TRANSFORM)

  def init_fn(params):
    del params
    if key is None:
      raise ValueError(
          "stochastic_rounding(key=None) can update a state but not create "
          "one: pass key= (an int seed or a jax.random key) to initialise.")
    return StochasticRoundingState(key=key)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "stochastic_rounding")
    next_key, draw_key = jax.random.split(state.key)
    updates = _rounding_update(updates, params, mask, grid, draw_key, "sr",
                               source)
    return updates, StochasticRoundingState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nearest_rounding(grid, mask=None) -> optax.GradientTransformationExtraArgs:
  """R update rule: after ``apply_updates``, ``w = Q_d(w + u)``.

  Exact for codes; for float leaves as in :func:`stochastic_rounding`.

  A weight on a stored point moves up (down) only when its update reaches
  half the gap to the next point up (down), compared exactly with
  precomputed half-gaps: R never moves a weight whose ``|u|`` is below half
  its gap, in every dtype, however far from the grid's offset; with a small
  learning rate it stalls (Li et al. 2017, Sec. 3). Codes and float leaves
  as in :func:`stochastic_rounding`.

  Args:
    grid: a :class:`~qjax.Grid`, ``(path, leaf) -> Grid``, or ``None`` when
      every quantized leaf is stored as codes.
    mask: which leaves to round (see :func:`qjax.resolve_mask`; default: the
      kernels); others get the incoming update unchanged. A mask that
      selects nothing is an error.
  """
  _check_grid(grid, "nearest_rounding")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "nearest_rounding")
    return _rounding_update(updates, params, mask, grid, None, "r"), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _one_ulp(x: jax.Array, downwards: bool) -> jax.Array:
  """``nextafter(x, -inf or +inf)`` for nonzero float32 ``x`` (zero kept),
  by integer arithmetic on the bits (cheaper than ``jnp.nextafter``)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  smaller = (x > 0) if downwards else (x < 0)  # magnitude shrinks
  bits = jnp.where(smaller, bits - jnp.uint32(1), bits + jnp.uint32(1))
  return jnp.where(x == 0, x, jax.lax.bitcast_convert_type(bits, jnp.float32))


def _clip_delta_f32(p, u, lo, hi):
  """``δ`` with ``p + δ = clip(p + u, lo, hi)`` for float32 latents.

  Unclipped entries take ``δ = u`` (``p + u`` is the value itself). A
  clipped one starts from ``bound - p`` with two residual corrections (as
  :func:`exact_delta`), then at most two one-ulp steps keep ``p + δ``
  inside the bounds, so a latent never leaves ``[lo, hi]``. The same
  stored latents as the general path with ``exact_delta`` up to rounding
  ties at the bounds (identical on 2.4 million test cases), without
  ``nextafter``: 0.79 ms against 1.33 ms for a 784x512 leaf on XLA:CPU,
  both in one one-off run (not kept as a benchmark).
  """
  s = p + u
  q = jnp.clip(s, lo, hi)
  delta = _corrected(p, q, jnp.where(s > hi, hi - p,
                                    jnp.where(s < lo, lo - p, u)))
  for _ in range(2):
    delta = jnp.where(p + delta > hi, _one_ulp(delta, True), delta)
    delta = jnp.where(p + delta < lo, _one_ulp(delta, False), delta)
  return jnp.where(jnp.isnan(s), s, delta)


def latent_clipping(grid, mask=None, scale_by_grid: bool = False
                    ) -> optax.GradientTransformationExtraArgs:
  """BC update rule on float latent weights: ``w_r <- clip(w_r + s u)``.

  The latent weights stay inside ``[grid.lo, grid.hi]`` (BinaryConnect's
  clip). With ``scale_by_grid`` the update is multiplied by ``1 / H`` with
  ``H = grid.hi`` the layer's binary scale, the per-layer learning-rate scale
  of the original BinaryConnect code.

  Args:
    grid: a bounded Grid or ``(path, leaf) -> Grid``.
    mask: which leaves are latent weights (see :func:`qjax.resolve_mask`;
      default: the kernels); others pass through unchanged. A mask that
      selects nothing is an error.
    scale_by_grid: scale each masked leaf's update by ``1 / grid.hi``.
  """
  _check_grid(grid, "latent_clipping")
  if isinstance(grid, Grid) and not grid.bounded:
    raise ValueError(
        "latent_clipping needs a bounded grid (lo and hi); got an unbounded "
        f"grid {grid}. Use Grid.binary(scale) or Grid.uniform(step, lo=, hi=).")

  def clip_leaf(p, u, g):
    if not g.bounded:
      raise ValueError(f"latent_clipping: leaf grid {g} has no bounds.")
    if isinstance(g, FloatGrid):
      lo32, hi32 = jnp.float32(g.lo), jnp.float32(g.hi)
    else:
      points = grid_lib.Points(g, p.dtype)
      lo32, hi32 = points.v[0], points.v[-1]
    u = jnp.asarray(u).astype(jnp.float32)
    if scale_by_grid:
      u = u / hi32
    if p.dtype == jnp.float32:
      return _clip_delta_f32(p, u, lo32, hi32)
    lo, hi = lo32.astype(p.dtype), hi32.astype(p.dtype)
    new = jnp.clip(p.astype(jnp.float32) + u, lo32, hi32)
    delta = exact_delta(p, new.astype(p.dtype))
    for _ in range(2):  # p + δ may round one ulp past a bound: nudge it in.
      delta = jnp.where(p + delta > hi, jnp.nextafter(delta, -jnp.inf), delta)
      delta = jnp.where(p + delta < lo, jnp.nextafter(delta, jnp.inf), delta)
    return delta

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "latent_clipping")
    mask_tree = quantizers.resolve_mask(mask, params)
    grids = quantizers.resolve_grids(grid, params, mask_tree)
    return quantizers.map_masked(lambda _, p, g, u: clip_leaf(p, u, g),
                                 params, mask_tree, grids, None,
                                 updates=updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state (unchanged by a skip).
    skipped: int32, how many steps were skipped in total.
    streak: int32, how many consecutive steps were skipped up to now (0 after
      a finite step); a growing streak means training has stopped.
  """
  inner_state: Any
  skipped: jax.Array
  streak: jax.Array


def finite(x) -> jax.Array:
  """One bool: every entry of the float array ``x`` is finite.

  ``sum(x * 0) == 0``: a product with zero is ``±0`` for a finite entry and
  NaN for a NaN or an infinity, and a sum of zeros is exactly zero, so no
  overflow can give a false alarm. One float reduction, fused with the
  producer of ``x``; ``jnp.all(jnp.isfinite(x))`` writes a boolean array
  and reduces it in a second pass (on XLA:CPU 0.151 ms against 0.089 ms
  for 784x512 floats, a one-off measurement not kept as a benchmark).
  """
  x = jnp.asarray(x)
  return jnp.sum(x * jnp.zeros((), x.dtype), dtype=jnp.float32) == 0


def all_finite(tree) -> jax.Array:
  """One bool: every floating-point entry of ``tree`` is finite."""
  ok = jnp.ones((), jnp.bool_)
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      ok = ok & finite(leaf)
  return ok


def _applied_finite(params, updates) -> jax.Array:
  """One bool: ``updates`` are finite and so is every float parameter
  ``optax.apply_updates(params, updates)`` would store."""
  if params is None:
    return all_finite(updates)
  ok = jnp.ones((), jnp.bool_)
  is_codes = codes_lib.is_codes
  for p, u in zip(jax.tree.leaves(params, is_leaf=is_codes),
                  jax.tree.leaves(updates, is_leaf=is_codes)):
    if is_codes(u) or not jnp.issubdtype(jnp.result_type(u), jnp.inexact):
      continue  # code steps are integers
    if is_codes(p) or not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
      ok = ok & finite(u)
    else:  # p finite and p + u finite imply u finite
      ok = ok & finite(formats.apply_updates(p, u))
  return ok


def _stays_finite(old, new) -> jax.Array:
  """One bool: no float state entry went from finite to non-finite."""
  ok = jnp.ones((), jnp.bool_)
  for o, n in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    if jnp.issubdtype(jnp.result_type(n), jnp.inexact):
      ok = ok & finite(jnp.where(jnp.isfinite(o), n, 0))
  return ok


def _no_update(u: jax.Array) -> jax.Array:
  """Zeros that leave every parameter bit for bit as it is.

  ``p + (-0.0) == p`` exactly for every ``p``, including ``p = -0.0``
  (``-0.0 + 0.0`` would give ``+0.0``), so grid weights stay grid weights.
  """
  if jnp.issubdtype(u.dtype, jnp.inexact):
    return jnp.full_like(u, -0.0)
  return jnp.zeros_like(u)


def skip_nonfinite(inner: optax.GradientTransformation, precheck=None
                   ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that a step with a NaN or inf is skipped entirely.

  Policy: a step is skipped when any incoming gradient entry, any entry of
  ``inner``'s output updates, any float parameter that
  ``optax.apply_updates`` would store (when ``params`` are passed), or any
  entry of its new state that was finite before is NaN or ±inf. A skipped
  step emits zero updates (``-0.0``, so
  ``optax.apply_updates`` leaves every parameter bit for bit unchanged, and
  grid weights stay on the grid) and keeps ``inner``'s state exactly as it
  was (Adam's moments never absorb a NaN; SR's key is not advanced), with
  ``skipped`` and ``streak`` incremented. A finite step behaves exactly like
  ``inner`` and resets ``streak`` to 0.

  Unlike ``optax.apply_if_finite``, non-finite updates are never let
  through, however many steps in a row are skipped: watch ``streak`` (or
  ``skipped``) to notice a run that no longer trains. Works under ``jit``
  and ``vmap`` (each lane skips on its own), with ``jnp.where`` on the trees.

  With a ``precheck`` (e.g. :func:`bounded_step`, which qjax's methods use
  around their own Adam and SGD steps) the skip is decided from the step's
  *inputs* alone: ``precheck(updates, inner_state, params)`` returns one
  bool, and the step is taken when it holds (or None: then the policy
  above applies). It is for an ``inner`` whose
  outputs are proven finite whenever the precheck holds; then no output is
  checked, and the selects fuse into ``inner``'s own update instead of
  reading every new parameter and moment again (the FP-ADAM MLP step:
  see the README's performance section).

  Args:
    inner: any optax transformation (extra args such as ``params`` are passed
      through).
    precheck: ``None`` (the policy above) or ``(updates, inner_state,
      params) -> bool`` (see above).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SkipNonFiniteState`.
  """
  if precheck is not None and not callable(precheck):
    raise TypeError(
        f"skip_nonfinite: precheck must be None or a function (updates, "
        f"inner_state, params) -> bool, e.g. "
        f"qjax.transforms.bounded_step('adam', lr); got {precheck!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros((), jnp.int32)
    return SkipNonFiniteState(inner.init(params), zero, zero)

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(updates, state.inner_state, params,
                                          **extra_args)
    ok = (None if precheck is None
          else precheck(updates, state.inner_state, params))
    if ok is None:
      ok = (all_finite(updates) & _applied_finite(params, new_updates)
            & _stays_finite(state.inner_state, new_inner))
    new_updates = jax.tree.map(lambda u: jnp.where(ok, u, _no_update(u)),
                               new_updates)
    new_inner = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_inner,
                             state.inner_state)
    skip = (~ok).astype(jnp.int32)
    return new_updates, SkipNonFiniteState(
        new_inner, state.skipped + skip, (state.streak + skip) * skip)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The bounds of bounded_step (powers of two, so that the checks are exact).
GRAD_BOUND = 2.0**50     # |g|: about 1.1e15
MOMENT_BOUND = 2.0**60   # Adam's |mu|: about 1.2e18
PARAM_BOUND = 2.0**120   # |p|, and Adam's nu: about 1.3e36
LR_BOUND = 2.0**20       # |learning rate|: about 1.0e6
_BOUNDED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64),
                   jnp.dtype(jnp.bfloat16))


def _within(tree, bound) -> jax.Array:
  """One bool: every float entry of ``tree`` has ``|x| <= bound`` (NaN
  fails; a maximum, exact whatever the order XLA reduces in)."""
  ok = jnp.ones((), jnp.bool_)
  for x in jax.tree.leaves(tree, is_leaf=codes_lib.is_codes):
    if (codes_lib.is_codes(x) or not jnp.issubdtype(jnp.result_type(x),
                                                    jnp.inexact)
        or not jnp.size(x)):
      continue  # codes are grid points, finite by construction
    ok = ok & (jnp.max(jnp.abs(x)).astype(jnp.float32) <= bound)
  return ok


def _states_of(tree, cls) -> list:
  """Every ``cls`` (an optax state NamedTuple) nested in ``tree``."""
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(
      x, cls)) if isinstance(x, cls)]


def bounded_step(optimizer: str, learning_rate):
  """The ``precheck`` of :func:`skip_nonfinite` for qjax's own steps.

  For ``optax.adam(learning_rate)`` with its defaults (b1 0.9, b2 0.999,
  eps 1e-8) or ``optax.sgd(learning_rate)``, optionally in float32 moments
  (:func:`qjax.float32_moments`), followed by qjax's update rules (latent
  clipping, SR and R onto any grid or format, codes). A step is taken when
  every gradient entry has ``|g| <= 2**50``, every float parameter
  ``|p| <= 2**120``, Adam's ``|mu| <= 2**60`` and ``nu <= 2**120``, and
  the learning rate is finite with ``|lr| <= 2**20``; otherwise it is
  skipped as a non-finite step would be (NaN fails every bound). Then
  every output is finite:

  * Adam's new moments are ``0.1 g + 0.9 mu`` (at most ``2**60`` plus
    rounding) and ``0.001 g**2 + 0.999 nu`` (at most ``2**120`` plus
    rounding); bias correction divides ``mu`` by ``1 - 0.9**t >= 0.1``,
    so ``|mu_hat| < 2**64``, and the step ``|lr mu_hat / (sqrt(nu_hat) +
    eps)| < 2**20 * 2**64 / 1e-8 < 2**111``. SGD's ``|lr g| <= 2**70``.
  * ``p + u`` is then below ``2**121``: finite in float32 and bfloat16
    (whose largest values are near ``2**128``). Parameters in float16 or
    fp8 are outside the proof: with any of them the precheck returns
    None, and :func:`skip_nonfinite` checks the outputs instead.
  * qjax's rules map finite ``p`` and ``u`` to finite values (clipping;
    a rounded value of the grid or format, saturating; integer codes).

  A step with a finite gradient above ``2**50``, a parameter above
  ``2**120``, a moment beyond its bound or a learning rate above ``2**20``
  is skipped here where the output-checking policy might take it (such a
  run has diverged, or its learning rate is not one anyone trains with).
  Within the bounds both policies skip exactly the steps with a NaN or
  inf, and give the same bits (tested with injected NaNs; the bounds are
  tested at and just beyond each).

  Args:
    optimizer: ``"adam"`` or ``"sgd"``.
    learning_rate: a float, a scalar array (traced in a sweep) or an optax
      schedule, evaluated at the count the step uses (from the optimizer's
      ``ScaleByScheduleState``).

  Returns:
    ``(updates, inner_state, params) -> bool``, or None where the proof
    does not apply (no ``params`` passed, a parameter neither float32,
    float64 nor bfloat16, or a schedule whose count is not found).
  """
  if optimizer not in ("adam", "sgd"):
    raise ValueError(f"bounded_step covers optax.adam and optax.sgd with "
                     f"their defaults; got optimizer={optimizer!r}.")

  def moments(inner_state):
    adam = _states_of(inner_state, optax.ScaleByAdamState)
    return [a.mu for a in adam], [a.nu for a in adam]

  def current_lr(inner_state):
    """The step's learning rate: the schedule at the count the step uses."""
    if not callable(learning_rate):
      return learning_rate
    counts = [x.count for x in
              _states_of(inner_state, optax.ScaleByScheduleState)]
    return learning_rate(counts[0]) if len(counts) == 1 else None

  def precheck(updates, inner_state, params):
    lr = current_lr(inner_state)
    if lr is None or params is None or any(
        jnp.issubdtype(jnp.result_type(p), jnp.inexact)
        and jnp.result_type(p) not in _BOUNDED_DTYPES
        for p in jax.tree.leaves(params, is_leaf=codes_lib.is_codes)
        if not codes_lib.is_codes(p)):
      return None
    lr = jnp.abs(jnp.asarray(lr, jnp.float32))
    ok = ((lr <= LR_BOUND) & _within(updates, GRAD_BOUND)
          & _within(params, PARAM_BOUND))
    if optimizer == "adam":
      mu, nu = moments(inner_state)
      ok = ok & _within(mu, MOMENT_BOUND) & _within(nu, PARAM_BOUND)
    return ok

  return precheck


def masked(inner: optax.GradientTransformation, mask
           ) -> optax.GradientTransformationExtraArgs:
  """``optax.masked`` with a qjax mask: ``inner`` on the selected leaves only.

  ``mask`` is anything :func:`qjax.resolve_mask` takes (a predicate
  ``(path, leaf) -> bool`` such as :func:`qjax.conv_kernels`, or a tree of
  bools); :class:`~qjax.Codes` count as leaves. The unselected leaves pass
  their updates through, as with ``optax.masked``. Inside it, build the qjax
  rule with ``mask=qjax.all_floats`` so that it acts on every leaf it is
  given (its default, the kernels, would skip a selected bias)::

      tx = optax.chain(optax.adam(1e-3), qjax.masked(
          qjax.stochastic_rounding(grid, key, mask=qjax.all_floats),
          qjax.conv_kernels))
  """
  return optax.masked(optax.with_extra_args_support(inner),
                      lambda tree: quantizers.resolve_mask(mask, tree))
