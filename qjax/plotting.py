"""Figures without pyplot, and one fixed colour per method.

Every qjax figure (``qjax.results.plot_curves``, the experiments' plots) is
a :class:`matplotlib.figure.Figure` built and saved directly: nothing here
imports ``matplotlib.pyplot`` or calls ``matplotlib.use``. Switching the
backend (the old ``matplotlib.use("Agg")``) is process-wide: in Jupyter it
replaced the inline backend, so the user's own ``plt.plot`` cells stopped
showing their figures after a qjax plot. A bare ``Figure`` needs no backend
at all: ``Figure.savefig`` renders a PNG through Agg by itself, and pyplot's
figure manager never holds (or leaks) qjax's figures.

Colours: :func:`method_color` keys a label on its method, with the
optimizer suffix and case removed ("sr", "SR-ADAM" and "sr-adam" are one
method), so a method has the same colour in every figure. A method's
several lines (learning rates, grid views, ...) keep its colour and differ
by :func:`variant` (linestyle and marker) or :func:`shades`.
"""

from __future__ import annotations

import colorsys
import hashlib
import os
import re

# Method -> (colour, spellings that name it once lowercased, split on "-",
# "_", "," or space and stripped of optimizer words and "(...)" notes, then
# joined with "-"). tab10 colours; a new method adds one line.
METHODS = {
    "fp": ("#7f7f7f", ("fp", "float", "full-precision")),        # tab:gray
    "bc": ("#1f77b4", ("bc", "binaryconnect")),                  # tab:blue
    "sbc": ("#17becf", ("bc-stochastic", "stochastic-bc", "bc_stochastic",
                                  "bc-s")),                      # tab:cyan
    "sr": ("#ff7f0e", ("sr",)),                                  # tab:orange
    "big-sr": ("#2ca02c", ("big-sr", "sr-big")),                 # tab:green
    "r": ("#d62728", ("r",)),                                    # tab:red
    "bop": ("#9467bd", ("bop",)),                                # tab:purple
}
# Optimizer words dropped from a label; a label of only these ("ADAM", the
# full-precision baseline's label) names the fp method.
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov", "rmsprop",
              "adagrad", "lion", "lamb", "lars")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")

_ALIASES = {alias: key for key, (_, aliases) in METHODS.items()
            for alias in aliases + (key.replace("_", "-"),)}


def figure(nrows: int = 1, ncols: int = 1, *, figsize=None, **kwargs):
  """A new figure and its axes, like ``plt.subplots`` but without pyplot.

  Args:
    nrows, ncols: the grid of axes.
    figsize: ``(width, height)`` in inches (matplotlib's default if None).
    **kwargs: passed to :meth:`matplotlib.figure.Figure.subplots`
      (``squeeze``, ``sharex``, ``sharey``, ``subplot_kw``, ...).

  Returns:
    ``(fig, axes)``: ``axes`` is one Axes or an array, as ``plt.subplots``.
  """
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig, path: str, dpi: int = 110) -> str:
  """Writes ``fig`` to ``path`` (its format from the suffix); the path.

  Makes the parent folder. Rendering goes through Agg for raster formats
  whatever the process' backend is; the backend is left as it was.
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def method_key(name: str) -> str:
  """The method a label names: ``"SR-ADAM"``, ``"sr"`` -> ``"sr"``.

  Case, optimizer words (``-adam``, ``-sgd``), parenthesized notes
  (``"BC (Q_s view)"``) and hyperparameters (``"lr=0.1"``, as in
  ``qjax.results.group_label``) are dropped; a label of only an optimizer
  (``"ADAM"``), or of nothing, is the full-precision baseline ``"fp"``. An
  unknown method comes back normalised (lowercase, words joined by ``-``).
  """
  text = re.sub(r"\([^)]*\)", " ", name.lower())
  words = [w for w in re.split(r"[\s,_\-]+", text) if w]
  kept = [w for w in words if w not in OPTIMIZERS and "=" not in w]
  if not kept:  # "ADAM", or "" (the fp label before its optimizer)
    return "fp"
  joined = "-".join(kept)
  return _ALIASES.get(joined, joined)


def method_color(name: str) -> str:
  """The fixed colour (``"#rrggbb"``) of the method that ``name`` labels.

  Known methods (:data:`METHODS`) have fixed, distinct colours; any other
  name gets a colour derived from a stable hash of its normalised name
  (the same in every process, unlike Python's salted ``hash``).
  """
  key = method_key(name)
  if key in METHODS:
    return METHODS[key][0]
  digest = hashlib.sha256(key.encode()).digest()
  hue = int.from_bytes(digest[:4], "big") / 2**32
  lightness = 0.35 + 0.2 * digest[4] / 255
  r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.7)
  return "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in (r, g, b)))


def variant(i: int, marker: bool = True) -> dict:
  """Plot keywords telling apart a method's ``i``-th line from its others.

  ``i = 0`` is a solid line with ``"o"`` markers; later lines cycle through
  :data:`LINESTYLES` and :data:`MARKERS`. The colour stays the method's.
  """
  style = {"linestyle": LINESTYLES[i % len(LINESTYLES)]}
  if marker:
    style["marker"] = MARKERS[i % len(MARKERS)]
  return style


def method_styles(labels, marker: bool = True) -> dict[str, dict]:
  """Per label, plot keywords: its method's colour and a :func:`variant`.

  Labels of one method (``"BC (Q_s view)"``, ``"BC (Q_d view)"``) share
  the colour and get variants 0, 1, ... in order.
  """
  seen: dict[str, int] = {}
  out = {}
  for label in labels:
    key = method_key(label)
    i = seen[key] = seen.get(key, -1) + 1
    out[label] = {"color": method_color(label), **variant(i, marker)}
  return out


def shades(color: str, n: int) -> list[str]:
  """``n`` tints of ``color``, lightest first, the last ``color`` itself.

  For one method's many lines (one per step size, say) where linestyles
  alone would repeat.
  """
  from matplotlib import colors
  rgb = colors.to_rgb(color)
  out = []
  for i in range(n):
    t = 0.6 * (1 - i / (n - 1)) if n > 1 else 0.0  # share of white
    out.append(colors.to_hex([c * (1 - t) + t for c in rgb]))
  return out
