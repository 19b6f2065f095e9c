"""Per-layer grids written as text, for configs and the command line.

A grid spec is ``KIND[:ARGS][@RULE]``:

=======================  ====================================================
spec                     grid of every quantized layer
=======================  ====================================================
``glorot``               BinaryConnect's ``{-H, +H}``, H the layer's Glorot
                         scale (the default; same as ``binary@glorot``)
``binary[:S]``           ``{-S, +S}``; ``binary`` is the paper's ``±1``
``ternary[:S]``          ``{-S, 0, +S}``
``kbit:B[:S]``           ``2**B`` evenly spaced levels on ``[-S, S]``
                         (``B`` in 1..16; zero is never a point)
``uniform:D[:LO:HI]``    the points ``k D`` through 0, within ``[LO, HI]``
                         when given (stored as codes); unbounded otherwise
                         (stored as float32 values on the grid)
``bf16``, ``f16``,       the finite values of a floating-point format
``fp8_e4m3``,            (:class:`qjax.FloatGrid`), stored in that format;
``fp8_e5m2``             no arguments, no scale rule, no ``grid_scale``
=======================  ====================================================

``S`` defaults to 1. The rule ``@glorot`` multiplies the grid by each
layer's Glorot scale H (e.g. ``kbit:2@glorot`` spans ``[-H, H]``). Numbers
are read exactly as written (``0.1`` is 1/10, :class:`qjax.Grid`).

A sweep's ``grid_scale`` multiplies the whole grid on top (a traced scale,
:meth:`qjax.Grid.scaled`), so ``--grid uniform:1:-8:8 --grid-scales
0.01,0.02`` sweeps the spacing Δ without recompiling.

Example:
  >>> spec = qjax.grids.parse("kbit:4")
  >>> grid_fn = spec.factory()       # (path, leaf) -> Grid
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Callable

from qjax import formats
from qjax import quantizers
from qjax.grid import Grid

KINDS = ("glorot", "binary", "ternary", "kbit", "uniform") + tuple(
    formats.FORMATS)
RULES = ("glorot",)
FORMS = ("glorot", "binary[:S]", "ternary[:S]", "kbit:B[:S]",
         "uniform:D[:LO:HI]", "...@glorot", "bf16", "f16", "fp8_e4m3",
         "fp8_e5m2")


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """A parsed grid spec (see the module docstring).

  Attributes:
    kind: one of :data:`KINDS`.
    args: the exact numbers after the kind (``Fraction``; ``bits`` an int).
    rule: ``None`` or ``"glorot"`` (multiply by each layer's H).
  """
  kind: str
  args: tuple = ()
  rule: str | None = None

  def __str__(self) -> str:
    text = ":".join([self.kind] + [_text(a) for a in self.args])
    return text + (f"@{self.rule}" if self.rule else "")

  def grid(self, layer_scale=1) -> Grid:
    """The grid for a layer whose scale rule gives ``layer_scale``."""
    if self.kind in formats.FORMATS:
      return formats.FloatGrid(self.kind)
    s = Fraction(layer_scale) if not isinstance(layer_scale, Fraction) else (
        layer_scale)
    if self.kind == "glorot":
      # Exactly quantizers.glorot_binary_grid's grid.
      return Grid.binary(float(s) if s == layer_scale else s)
    if self.kind == "binary":
      return Grid.binary(self.args[0] * s)
    if self.kind == "ternary":
      return Grid.ternary(self.args[0] * s)
    if self.kind == "kbit":
      return Grid.kbit(self.args[0], self.args[1] * s)
    step = self.args[0] * s
    if len(self.args) == 1:
      return Grid.uniform(step)
    return Grid.uniform(step, lo=self.args[1] * s, hi=self.args[2] * s)

  @property
  def per_layer(self) -> bool:
    """Whether the grid depends on the layer (a Glorot scale)."""
    return self.kind == "glorot" or self.rule == "glorot"

  def factory(self, scale=None) -> Callable:
    """``(path, leaf) -> Grid``, times the (possibly traced) ``scale``."""
    shared = None if self.per_layer else self.grid()

    if scale is not None and self.kind in formats.FORMATS:
      formats.FloatGrid(self.kind).scaled(scale)  # the error: no scale

    def grid(path, leaf):
      del path
      g = shared if shared is not None else self.grid(
          quantizers.glorot_scale(quantizers.leaf_shape(leaf)))
      return g if scale is None else g.scaled(scale)
    grid.spec = str(self)
    return grid


def _text(a) -> str:
  if isinstance(a, int):
    return str(a)
  return str(a.numerator) if a.denominator == 1 else (
      f"{float(a):g}" if Fraction(f"{float(a):g}") == a else str(a))


def _number(text: str, what: str, spec: str) -> Fraction:
  try:
    value = Fraction(text)
  except (ValueError, ZeroDivisionError):
    raise ValueError(f"grid {spec!r}: {what} must be a number; got "
                     f"{text!r}.") from None
  return value


def _usage(spec: str, why: str) -> ValueError:
  return ValueError(f"grid {spec!r}: {why}. Forms: {', '.join(FORMS)} (e.g. "
                    "binary, glorot, ternary, kbit:4, uniform:0.05:-1:1, "
                    "kbit:2@glorot).")


def parse(text: str) -> GridSpec:
  """Parses ``text`` into a :class:`GridSpec`; every mistake is an error.

  Raises:
    ValueError: an unknown kind or rule, a wrong number of arguments, a
      non-positive scale or spacing, bounds that do not contain a point.
  """
  if isinstance(text, GridSpec):
    return text
  if not isinstance(text, str) or not text.strip():
    raise _usage(str(text), "expected a non-empty string")
  spec = text.strip()
  body, _, rule = spec.partition("@")
  if "@" in spec and rule not in RULES:
    raise _usage(spec, f"unknown scale rule {rule!r} (rules: {RULES})")
  kind, *raw = body.split(":")
  kind = formats.ALIASES.get(kind.lower(), kind.lower())
  if kind not in KINDS:
    raise _usage(spec, f"unknown kind {kind!r}")
  rule = rule or None
  if kind in formats.FORMATS:
    if raw or rule:
      raise _usage(spec, f"the float format {kind} takes no arguments and "
                   "no scale rule (its values are the format's)")
    result = GridSpec(kind)
  elif kind == "glorot":
    if raw or rule:
      raise _usage(spec, "glorot takes no arguments (it is binary@glorot)")
    result = GridSpec("glorot")
  elif kind in ("binary", "ternary"):
    if len(raw) > 1:
      raise _usage(spec, f"{kind} takes at most one argument, its scale S")
    s = _number(raw[0], "the scale S", spec) if raw else Fraction(1)
    _positive(s, "the scale S", spec)
    if kind == "binary" and rule == "glorot" and s == 1:
      result = GridSpec("glorot")
    else:
      result = GridSpec(kind, (s,), rule)
  elif kind == "kbit":
    if not 1 <= len(raw) <= 2:
      raise _usage(spec, "kbit takes the bits B and optionally the scale S")
    try:
      bits = int(raw[0])
    except ValueError:
      raise _usage(spec, f"bits must be an integer; got {raw[0]!r}") from None
    if not 1 <= bits <= 16:
      raise _usage(spec, f"bits must be in 1..16; got {bits}")
    s = _number(raw[1], "the scale S", spec) if len(raw) == 2 else Fraction(1)
    _positive(s, "the scale S", spec)
    result = GridSpec("kbit", (bits, s), rule)
  else:
    if len(raw) not in (1, 3):
      raise _usage(spec, "uniform takes the spacing D, optionally with LO:HI")
    nums = tuple(_number(r, w, spec) for r, w in
                 zip(raw, ("the spacing D", "LO", "HI")))
    _positive(nums[0], "the spacing D", spec)
    if len(nums) == 3 and not nums[1] <= 0 <= nums[2]:
      raise _usage(spec, "the bounds must satisfy LO <= 0 <= HI (the grid "
                   "runs through 0)")
    result = GridSpec("uniform", nums, rule)
  result.grid(1)  # every remaining check of qjax.Grid, now
  return result


def _positive(value: Fraction, what: str, spec: str) -> None:
  if value <= 0:
    raise _usage(spec, f"{what} must be positive; got {_text(value)}")
