"""Rotary position embeddings as data: the inverse frequencies transformers computes for a
config's ``rope_parameters``, as numpy float32 arrays.

Numpy, not torch: the emitter writes its cos/sin caches from these without importing torch, and
the torch export module turns them into buffers only when it is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraformat.architecture.protocol import CheckpointInfo


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: inverse frequencies (float32 [dim/2]) over the first ``dim``
    channels of a head, and the factor cos/sin are scaled by. With ``long_inv_freq`` (LongRoPE),
    those replace ``inv_freq`` whenever the highest position + 1 exceeds ``threshold``.

    Two ropes are equal when their numbers are (array fields compared by value), so a spec's
    equality and hash stay meaningful.
    """

    inv_freq: np.ndarray
    dim: int
    scaling: float = 1.0
    long_inv_freq: np.ndarray | None = None
    threshold: int = 0

    def _key(self) -> tuple[Any, ...]:
        long = None if self.long_inv_freq is None else self.long_inv_freq.tobytes()
        return (self.inv_freq.tobytes(), self.dim, self.scaling, long, self.threshold)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rope) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _f32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _exponents(dim: int) -> np.ndarray:
    """``arange(0, dim, 2) / dim`` in float32, as transformers computes it."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)


def rope_from_config(
    params: Mapping[str, Any], config: Mapping[str, Any], head_dim: int, where: CheckpointInfo
) -> Rope:
    """The :class:`Rope` transformers builds for ``params`` (a ``rope_parameters`` dict, or the
    older ``rope_scaling`` + top-level ``rope_theta``): default, linear, llama3, longrope (su),
    yarn."""
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    dim = int(head_dim * partial)
    kind = params.get("rope_type", params.get("type", "default"))
    exponents = _exponents(dim)
    inv_freq = _f32(1.0 / (np.float32(theta) ** exponents))
    if kind == "default":
        return Rope(inv_freq, dim)
    if kind == "linear":
        return Rope(_f32(inv_freq / np.float32(params["factor"])), dim)
    if kind == "llama3":
        factor = np.float32(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = _f32(2 * math.pi / inv_freq)
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = _f32((old_ctx / wavelen - low) / (high - low))
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return Rope(_f32(np.where(medium, smoothed, scaled)), dim)
    if kind in ("longrope", "su"):
        original, factor = context_scaling(params, config, "longrope", where)
        original = int(original)
        attention = params.get("attention_factor")
        if attention is None:
            # LongRoPE's recommended attention scaling, as transformers computes it.
            attention = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            )
        base = _f32(np.float32(theta) ** exponents)
        short = _f32(1.0 / (_f32(params["short_factor"]) * base))
        long = _f32(1.0 / (_f32(params["long_factor"]) * base))
        return Rope(short, dim, float(attention), long, original)
    if kind == "yarn":
        return yarn_rope(params, config, theta, dim, where)
    raise where.config_error(
        f"rope type {kind!r} is not supported by the decoder export module "
        "(supported: default, linear, llama3, longrope, yarn)"
    )


def context_scaling(
    params: Mapping[str, Any], config: Mapping[str, Any], kind: str, where: CheckpointInfo
) -> tuple[Any, Any]:
    """(original context, scaling factor) of a context-extending rope: the factor defaults to
    ``max_position_embeddings / original``, as transformers computes it."""
    original = params.get(
        "original_max_position_embeddings", config.get("original_max_position_embeddings")
    )
    if original is None:
        raise where.config_error(f"{kind} needs 'original_max_position_embeddings'")
    factor = params.get("factor")
    if factor is None:
        factor = float(config.get("max_position_embeddings", original)) / int(original)
    return original, factor


def yarn_rope(
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    theta: float,
    dim: int,
    where: CheckpointInfo,
) -> Rope:
    """YaRN (transformers' ``_compute_yarn_parameters``): interpolated frequencies below the
    correction range, extrapolated above it, a linear ramp between; cos/sin scaled by the
    attention factor (from ``mscale``/``mscale_all_dim`` when the config does not give it)."""
    original, factor = context_scaling(params, config, "yarn", where)
    original, factor = float(original), float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip(
        (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1
    )
    base = _f32(np.float32(theta) ** _exponents(dim))
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (np.float32(factor) * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    return Rope(_f32(inv_freq), dim, float(attention))


def no_rope() -> Rope:
    """The "rope" of a layer without positional rotation (SmolLM3's NoPE layers)."""
    return Rope(np.zeros(0, np.float32), 0)


__all__ = ["Rope", "context_scaling", "no_rope", "rope_from_config", "yarn_rope"]
