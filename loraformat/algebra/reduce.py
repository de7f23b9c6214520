"""Rank reduction on the factors: the best rank-k approximation (Eckart–Young) of ΔW = s·B·A.

Never builds the dense ΔW. With B = Q_B·R_B (rows×r) and Aᵀ = Q_A·R_A (in×r), ΔW =
Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ; the SVD of the small r×r core, U_c·Σ·V_cᵀ, gives ΔW's SVD
(Q_B·U_c)·Σ·(Q_A·V_c)ᵀ in O((in+rows)·r²). The relative Frobenius error of keeping k values is
exactly sqrt(Σ_{i>k} σᵢ²) / sqrt(Σ σᵢ²).

Output factors: σ goes into B (B = U_k·diag(σ_k), A = V_kᵀ with orthonormal rows), the convention
of PEFT's svd combination; the layer gets alpha = rank under ``alpha/r`` so its scale is 1.

An expert layer is reduced expert by expert (one SVD each) to one rank for the layer (the format
has one rank per layer): a given rank as for a dense layer; an energy threshold met by every
expert, so the largest rank any expert needs (the others keep more than they need).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ._common import (
    cast,
    describe_input,
    expert_indices,
    f64,
    join_experts,
    layer_of,
    output_dtype,
    provenance,
    refuse_nonfinite,
    stack_error,
)


@dataclass(frozen=True)
class FactoredSVD:
    """ΔW = U·diag(s)·Vt with U rows×k and Vt k×in orthonormal, s descending."""

    U: np.ndarray
    s: np.ndarray
    Vt: np.ndarray


#: Below this κ(X), CholeskyQR (R = chol(XᵀX)ᵀ) alone is accurate to ~κ²·eps ≤ 1e-10; below the
#: second, CholeskyQR2 is accurate to machine precision (Yamamoto et al. 2015); above, Householder.
_CHOLESKY_QR1_MAX_COND = 1e3
_CHOLESKY_QR2_MAX_COND = 1e6


class _TallQR:
    """Reduced QR of a tall-skinny float64 matrix X (m×r), Q kept implicit where possible.

    ``R`` is r'×r (r' = min(m, r)); :meth:`q_times` gives Q·M without forming Q when the
    Cholesky route was taken (X·(R⁻¹·M): one thin product instead of two). The Cholesky routes
    need only matrix products, several times faster than Householder QR for LoRA-sized r;
    ill-conditioned or rank-deficient inputs (e.g. stacks of dependent factors) take Householder,
    so the result is always backward stable.
    """

    def __init__(self, x: np.ndarray) -> None:
        m, r = x.shape
        self._x = x
        self._q: np.ndarray | None = None
        self._r_inv: np.ndarray | None = None
        if m >= 2 * r and np.all(np.isfinite(x)):
            try:
                r1 = np.linalg.cholesky(x.T @ x).T
                r1_inv = np.linalg.inv(r1)
                # ‖R‖_F·‖R⁻¹‖_F bounds κ₂(R) = κ₂(X) from above: cheap and on the safe side
                cond = np.linalg.norm(r1) * np.linalg.norm(r1_inv)
                if cond < _CHOLESKY_QR1_MAX_COND:
                    self.R, self._r_inv = r1, r1_inv
                    return
                if cond < _CHOLESKY_QR2_MAX_COND:
                    q1 = x @ r1_inv
                    r2 = np.linalg.cholesky(q1.T @ q1).T
                    self.R, self._q = r2 @ r1, q1 @ np.linalg.inv(r2)
                    return
            except np.linalg.LinAlgError:
                pass
        self._q, self.R = np.linalg.qr(x)

    def q_times(self, m: np.ndarray) -> np.ndarray:
        if self._q is not None:
            return self._q @ m
        return self._x @ (self._r_inv @ m)


def tall_qr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced QR (Q m×r', R r'×r) of a tall-skinny matrix; see :class:`_TallQR`."""
    qr = _TallQR(np.asarray(x, dtype=np.float64))
    return qr.q_times(np.eye(qr.R.shape[0])), qr.R


class _CoreSVD:
    """ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ with the small core's SVD; singular vectors formed on demand."""

    def __init__(self, B: np.ndarray, A: np.ndarray, scale: float) -> None:
        self._qb = _TallQR(f64(B))  # rows×m, m×r   (m = min(rows, r))
        self._qa = _TallQR(f64(A).T)  # in×n, n×r    (n = min(in, r))
        core = (self._qb.R * float(scale)) @ self._qa.R.T
        self._uc, self.s, self._vct = np.linalg.svd(core, full_matrices=False)

    def factors(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(U_k rows×k, V_kᵀ k×in) for the top k singular values."""
        u = self._qb.q_times(self._uc[:, :k])
        vt = self._qa.q_times(self._vct[:k].T).T
        return u, vt


def factored_svd(B: np.ndarray, A: np.ndarray, scale: float = 1.0) -> FactoredSVD:
    """SVD of ``scale·B·A`` from the factors (float64), via two tall QRs and an r×r SVD."""
    core = _CoreSVD(B, A, scale)
    u, vt = core.factors(core.s.size)
    return FactoredSVD(u, core.s, vt)


def energy_rank(s: np.ndarray, energy: float) -> int:
    """The smallest k ≥ 1 with Σ_{i<k} sᵢ² ≥ energy·Σ sᵢ².

    A relative slack of 1e-12 absorbs rounding (energy 1.0 gives the full rank, not one more).
    """
    if not 0.0 < energy <= 1.0:
        raise LoraformatError(None, f"energy must be in (0, 1], got {energy}")
    power = np.asarray(s, dtype=np.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = np.cumsum(power)
    k = int(np.searchsorted(cumulative, energy * total * (1.0 - 1e-12), side="left")) + 1
    return max(1, min(k, power.size))


def relative_error(s: np.ndarray, k: int) -> float:
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F for the best rank-k approximation, from the singular values."""
    power = np.asarray(s, dtype=np.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float(power[k:].sum()), 0.0) / total)


def parse_rank_pattern(text: str) -> dict[str, int]:
    """``'q_proj=8,v_proj=4'`` → ``{'q_proj': 8, 'v_proj': 4}``."""
    pattern: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            rank = int(value)
        except ValueError:
            rank = 0
        if not sep or not key.strip() or rank < 1:
            raise LoraformatError(
                None, f"rank pattern item {item!r} is not PATTERN=RANK with a positive integer rank"
            )
        pattern[key.strip()] = rank
    return pattern


def pattern_rank(path: str, pattern: Mapping[str, int]) -> int | None:
    """The rank of the first pattern matching ``path``: a glob on the whole path, or a suffix of
    whole path components (``q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    for key, rank in pattern.items():
        if (
            path == key
            or path.endswith("." + key)
            or fnmatch.fnmatchcase(path, key)
            or fnmatch.fnmatchcase(path, "*." + key)
        ):
            return rank
    return None


@dataclass(frozen=True)
class LayerReduction:
    """What reduce did to one layer."""

    path: str
    rank_in: int
    rank_out: int
    relative_error: float  # ‖ΔW − ΔW_kept‖_F / ‖ΔW‖_F, exact from the discarded σ
    kept_energy: float  # Σσ²(kept) / Σσ²


def reduce_layer(
    layer: LoraLayer, scale: float, k: int | None = None, energy: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(A float64, B float64 with σ folded in and scale 1, all singular values, kept rank).

    ``k`` None and ``energy`` None: full rank (lossless). Kept rank is at least 1 (the format needs
    it) and at most the number of singular values, min(rows, in, r).
    """
    core = _CoreSVD(layer.B, layer.A, scale)
    available = core.s.size
    if energy is not None and k is None:
        k = energy_rank(core.s, energy)
    k = available if k is None else min(int(k), available)
    k = max(k, 1)
    u, vt = core.factors(k)
    return vt, u * core.s[:k], core.s, k


def reduce(
    adapter: Adapter,
    rank: int | None = None,
    *,
    energy: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    dtype: str | np.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Adapter, list[LayerReduction]]:
    """Each layer's best approximation of rank ``rank``, or of the smallest rank keeping
    ``energy`` of Σσ²; ``rank_pattern`` (first matching pattern wins) overrides per layer; layers
    no rule covers keep their full rank (a lossless refactorisation). Returns the adapter and a
    per-layer report.

    DoRA magnitudes are kept unchanged (the low-rank part is approximated); a layer's lora_bias is
    rescaled so ``scale·lora_bias`` is unchanged. Replacement tensors are copied.
    """
    if rank is not None and rank < 1:
        raise LoraformatError(None, f"rank must be a positive integer, got {rank}")
    if rank is not None and energy is not None:
        raise LoraformatError(None, "give either a rank or an energy, not both")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise LoraformatError(None, f"energy must be in (0, 1], got {energy}")
    if rank is None and energy is None and not rank_pattern:
        raise LoraformatError(None, "reduce needs a rank, an energy or a rank pattern")
    out_dtype = output_dtype([adapter], dtype)
    layers: dict[str, LoraLayer] = {}
    report: list[LayerReduction] = []
    paths = adapter.layer_paths
    for i, path in enumerate(paths):
        refuse_nonfinite(adapter, path, "reduce")
        layer = adapter.layer(path)
        scale = adapter.scale(path)
        k = pattern_rank(path, rank_pattern) if rank_pattern else None
        e = None
        if k is None:
            k, e = rank, energy
        experts = expert_indices([adapter], path)
        if e is not None and experts != [None]:
            # one rank for the layer: the largest any expert needs to keep the energy
            k = max(energy_rank(_CoreSVD(x.B, x.A, scale).s, e)
                    for x in (layer_of(adapter, path, j) for j in experts))
            e = None
        parts, kept_power, total_power, errors, norms = [], 0.0, 0.0, [], []
        for expert in experts:
            a, b, s, kept = reduce_layer(layer_of(adapter, path, expert), scale, k, e)
            power = s**2
            kept_power += float(power[:kept].sum())
            total_power += float(power.sum())
            errors.append(relative_error(s, kept))
            norms.append(math.sqrt(float(power.sum())))
            parts.append(LoraLayer(A=cast(a, out_dtype), B=cast(b, out_dtype), alpha=float(kept),
                                   in_features=layer.in_features,
                                   out_features=layer.out_features, kind=layer.kind,
                                   out_rows=layer.out_rows))
        report.append(
            LayerReduction(
                path=path,
                rank_in=layer.rank,
                rank_out=kept,
                relative_error=stack_error(errors, norms),
                kept_energy=kept_power / total_power if total_power else 1.0,
            )
        )
        joined = join_experts(parts, experts)
        joined.magnitude = None if layer.magnitude is None else np.array(layer.magnitude)
        joined.lora_bias = (
            None if layer.lora_bias is None else cast(f64(layer.lora_bias) * scale, out_dtype)
        )
        layers[path] = joined
        if progress:
            progress(i + 1, len(paths))
    result = Adapter.from_layers(
        adapter.architecture,
        layers,
        scaling="alpha/r",
        replacements={n: np.array(adapter.replacement(n)) for n in adapter.replacement_names}
        or None,
        base_name=adapter.manifest["base_model"].get("name"),
        fingerprint=adapter.fingerprint,
        provenance=provenance(
            "reduce",
            {
                "rank": rank,
                "energy": energy,
                "rank_pattern": dict(rank_pattern) if rank_pattern else None,
                "dtype": str(out_dtype),
            },
            [describe_input(adapter)],
        ),
    )
    return result, report


def report_json(report: list[LayerReduction]) -> list[dict[str, Any]]:
    return [asdict(row) for row in report]
