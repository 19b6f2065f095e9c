"""qjax: train neural networks with coarsely quantized weights in JAX.

Implements Li, De, Xu, Studer, Samet, Goldstein, "Training Quantized Nets: A
Deeper Understanding" (NeurIPS 2017): grids, quantizers, optax update rules for
BinaryConnect (BC), stochastic rounding (SR) and deterministic rounding (R).
"""

from qjax import codes
from qjax import formats
from qjax import grid
from qjax import grids
from qjax import methods
from qjax import network
from qjax.grid import Grid
from qjax.grid import contains
from qjax.codes import Codes
from qjax.formats import FloatGrid
from qjax.formats import apply_updates
from qjax.formats import float32_moments
from qjax.methods import Method
from qjax.quantizers import all_floats
from qjax.quantizers import all_kernels
from qjax.quantizers import conv_kernels
from qjax.quantizers import default_mask
from qjax.quantizers import glorot_binary_grid
from qjax.quantizers import glorot_scale
from qjax.quantizers import mean_abs_scale
from qjax.quantizers import quantize
from qjax.quantizers import resolve_grids
from qjax.quantizers import resolve_mask
from qjax.quantizers import round_nearest
from qjax.quantizers import round_stochastic
from qjax.quantizers import sign
from qjax.quantizers import stochastic_binarize
from qjax.quantizers import straight_through
from qjax.transforms import SkipNonFiniteState
from qjax.transforms import StochasticRoundingState
from qjax.transforms import decoded
from qjax.transforms import latent_clipping
from qjax.transforms import masked
from qjax.transforms import nearest_rounding
from qjax.transforms import skip_nonfinite
from qjax.transforms import stochastic_rounding

# 0.2: TrainState.model_state (was batch_stats), method registry, grid specs;
# checkpoints of 0.1 are refused by their fingerprint, not misread.
__version__ = "0.2.0"

__all__ = (
    "Codes",
    "FloatGrid",
    "Grid",
    "Method",
    "SkipNonFiniteState",
    "StochasticRoundingState",
    "all_floats",
    "all_kernels",
    "apply_updates",
    "codes",
    "contains",
    "conv_kernels",
    "decoded",
    "default_mask",
    "float32_moments",
    "formats",
    "glorot_binary_grid",
    "grid",
    "grids",
    "glorot_scale",
    "latent_clipping",
    "masked",
    "mean_abs_scale",
    "methods",
    "nearest_rounding",
    "network",
    "quantize",
    "resolve_grids",
    "resolve_mask",
    "round_nearest",
    "round_stochastic",
    "sign",
    "skip_nonfinite",
    "stochastic_binarize",
    "stochastic_rounding",
    "straight_through",
)
