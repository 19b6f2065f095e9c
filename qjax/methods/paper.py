"""The paper's methods: FP, BC, SR and R (Li et al. 2017, Sec. 3).

Each is a factory ``Setup -> Method`` registered under its name; see
:mod:`qjax.methods` for the table of views, rules and stored weights.
"""

from __future__ import annotations

from qjax import quantizers
from qjax import transforms
from qjax.methods import Method
from qjax.methods import guarded
from qjax.methods import identity
from qjax.methods import identity_view
from qjax.methods import register

EVAL_STORED = "stored grid weights"


@register("fp", label="", eval_mode="float", stores="float", quantized=False,
          doc="full-precision baseline (the optimizer alone)")
def fp(setup) -> Method:
  """Full-precision baseline: the base optimizer, nothing quantized."""
  return Method(setup.label, identity_view,
                transforms.skip_nonfinite(setup.base(), setup.precheck()),
                identity, "float")


def bc_view(setup, stochastic: bool = False):
  """BinaryConnect's forward view with the (clipped) STE.

  ``Q_d(w_r)``; with ``stochastic``, ``Q_s(w_r)`` drawn from the view's key
  when it is given (training) and ``Q_d(w_r)`` without one (evaluation).
  """
  clip = setup.hparams.get("ste_clip")

  def view(params, key=None):
    if stochastic and key is not None:
      return quantizers.quantize(params, quantizers.round_stochastic,
                                 setup.mask, grid=setup.grid, key=key,
                                 clip=clip)
    return quantizers.quantize(params, quantizers.round_nearest, setup.mask,
                               grid=setup.grid, clip=clip)
  return view


def bc_tx(setup):
  """BC's chain: the base step, then the latent weights clipped."""
  rule = setup.masked(transforms.latent_clipping(
      setup.grid, quantizers.all_floats,
      bool(setup.hparams.get("scale_by_grid"))))
  return guarded(setup.base(), rule, setup.precheck())


@register("bc", label="BC", eval_mode="deterministic-quantized latent",
          stores="float latent",
          hparams={"ste_clip": None, "scale_by_grid": False},
          doc="BinaryConnect: Q_d in the forward pass, float latent weights")
def bc(setup) -> Method:
  """BinaryConnect (Li et al. 2017, Eq. 5): ``w_r <- clip(w_r - a g(Q_d))``.

  Own hyperparameters (static): ``ste_clip`` zeroes the STE gradient where
  ``|w_r| > ste_clip``; ``scale_by_grid`` scales each layer's step by
  ``1/H``.
  """
  return Method(setup.label, bc_view(setup), bc_tx(setup), setup.clip_latent,
                "deterministic-quantized latent")


@register("sr", label="SR", eval_mode=EVAL_STORED, stores="grid codes",
          doc="stochastic rounding of every update onto the grid")
def sr(setup) -> Method:
  """Stochastic rounding (Li et al. 2017, Eq. 3): ``w <- Q_s(w - a g)``."""
  rule = setup.masked(transforms.stochastic_rounding(
      setup.grid, setup.key, quantizers.all_floats,
      random_bits=setup.random_bits))
  return Method(setup.label, identity_view,
                guarded(setup.base(), rule, setup.precheck()),
                setup.encode, EVAL_STORED)


@register("r", label="R", eval_mode=EVAL_STORED, stores="grid codes",
          doc="deterministic rounding of every update onto the grid")
def r(setup) -> Method:
  """Deterministic rounding (Li et al. 2017, Eq. 2): ``w <- Q_d(w - a g)``."""
  rule = setup.masked(transforms.nearest_rounding(setup.grid,
                                                  quantizers.all_floats))
  return Method(setup.label, identity_view,
                guarded(setup.base(), rule, setup.precheck()),
                setup.encode, EVAL_STORED)
