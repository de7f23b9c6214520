"""Adapter algebra: pure functions adapter(s) → adapter, in memory, in float64.

* :func:`stack` — ΔW = Σ wᵢ·ΔWᵢ exactly (ranks concatenated); :func:`subtract`, :func:`scale`.
* :func:`reduce` — per-layer best rank-k approximation computed on the factors (QR + small SVD).
* :func:`combine` — the methods of PEFT's ``add_weighted_adapter`` with the same meaning.
* :func:`extract` — an adapter from two checkpoints' weight difference (randomized SVD, streamed).

Outputs of stack/subtract/reduce/combine/extract have scale 1 on every layer (scaling rule
``alpha/r`` with alpha = rank): each input's own scale is folded into B. ``scale`` keeps the
input's scaling rule and alphas. Output tensors take the inputs' dtype unless ``dtype`` is given.
Every output records ``provenance`` (operation, parameters, inputs with their tensors_sha256).
"""

from ._common import DTYPE_CHOICES
from .combine import METHODS, LayerCombination, combine
from .extract import LayerExtraction, extract, randomized_svd
from .ops import scale, stack, subtract
from .reduce import (
    FactoredSVD,
    LayerReduction,
    energy_rank,
    factored_svd,
    parse_rank_pattern,
    reduce,
    relative_error,
)

__all__ = [
    "DTYPE_CHOICES",
    "METHODS",
    "FactoredSVD",
    "LayerCombination",
    "LayerExtraction",
    "LayerReduction",
    "combine",
    "energy_rank",
    "extract",
    "factored_svd",
    "parse_rank_pattern",
    "randomized_svd",
    "reduce",
    "relative_error",
    "scale",
    "stack",
    "subtract",
]
