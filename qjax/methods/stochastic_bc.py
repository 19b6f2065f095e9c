"""BinaryConnect with stochastic forward binarization (``sbc``).

BinaryConnect's stochastic variant (Courbariaux et al. 2015; Li et al. 2017,
Sec. 3, note that BC may use ``Q_s`` in the forward pass): in training the
forward pass sees ``Q_s(w_r)``, drawn afresh at every step from the key the
engine passes to ``Method.view``; the float latent weights are updated and
clipped as in BC. Evaluation (no key) sees the deterministic ``Q_d(w_r)``,
the binary net one would deploy.
"""

from __future__ import annotations

from qjax.methods import Method
from qjax.methods import register
from qjax.methods import paper

EVAL_MODE = "deterministic-quantized latent"


@register("sbc", label="SBC", eval_mode=EVAL_MODE, stores="float latent",
          hparams={"ste_clip": None, "scale_by_grid": False},
          doc="BinaryConnect with stochastic binarization Q_s in training")
def stochastic_bc(setup) -> Method:
  """Stochastic BinaryConnect: ``Q_s(w_r)`` forward in training, ``Q_d`` in
  evaluation; BC's clipped latent update. Same options as ``bc``."""
  return Method(setup.label, paper.bc_view(setup, stochastic=True),
                paper.bc_tx(setup), setup.clip_latent, EVAL_MODE)
