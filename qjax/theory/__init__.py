"""Theory of Li et al. 2017 as code: convex problems and bounds, SR Markov
chains.

See docs/theory.md for the statements, their assumptions and the flagged
constants; experiments/convex_floors.py and experiments/markov_chain.py
reproduce the claims.
"""

from qjax.theory import convex
from qjax.theory import markov

__all__ = (
    "convex",
    "markov",
)
