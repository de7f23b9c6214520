"""ONNX Runtime's ``MatMulNBits`` blockwise weight format: quantize and dequantize, pure numpy.

``MatMulNBits(A, B, scales, zero_points)`` (``com.microsoft``) computes ``A · Wᵀ`` for a weight
``W`` of shape [N, K] — an nn.Linear weight as stored, out × in — quantized in blocks of
``block_size`` consecutive elements along K:

========================== ================================= ==================================
input                      shape                             content
========================== ================================= ==================================
``B``                      [N, k_blocks, block_size·bits/8]  uint8; 4-bit: element 2i in the low
                                                             nibble, 2i+1 in the high one
``scales``                 [N, k_blocks]                     float (the model's dtype)
``zero_points`` (asym.)    [N, ⌈k_blocks·bits/8⌉]            uint8, packed like ``B``; an unused
                                                             high nibble holds 8
========================== ================================= ==================================

with ``k_blocks = ⌈K / block_size⌉`` (K is zero-padded to a whole block) and
``w ≈ (q − zp) · scale``. Symmetric quantization has no zero-point input (zp is 2^(bits−1)).

The arithmetic is MLAS's (``BlockwiseQuantizer``, which ONNX Runtime's ``MatMulNBitsQuantizer``
calls through ``quantize_matmul_4bits``/``_8bits``), reproduced operation by operation in float32
so the output is bit-identical to ONNX Runtime's (``tests/test_quant_matmulnbits.py`` checks it):

* asymmetric: ``lo = min(min(block), 0)``, ``hi = max(max(block), 0)``,
  ``scale = (hi − lo) / (2^bits − 1)``, ``zp = roundf(−lo / scale)`` clamped to [0, 2^bits − 1]
  (``zp = 0`` when ``scale`` is 0);
* symmetric: ``m`` = the block's value of largest magnitude (the later of a tie goes to the
  minimum), ``scale = −m / 2^(bits−1)``, ``zp = 2^(bits−1)``;
* ``q = clamp(roundf(v · (1/scale) + zp), 0, 2^bits − 1)``, ``1/scale`` taken as 0 when scale is 0;
  ``roundf`` rounds halves away from zero (numpy's ``round`` does not).

:func:`quantize` calls that same ONNX Runtime function when onnxruntime is installed (it is a
runtime dependency, and faster than numpy: README, "Why the design is as it is"; it matters for
an 8B model's thousands of weights) and the numpy code otherwise; :func:`quantize_numpy` is the
reference the tests hold both to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BITS = (4, 8)
DEFAULT_BLOCK_SIZE = 32


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight in ``MatMulNBits`` form (see the module docstring for the layouts)."""

    packed: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ⌈k_blocks·bits/8⌉], None when symmetric
    bits: int
    block_size: int
    k: int  # in-features (unpadded)

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])


def check_params(bits: int, block_size: int) -> None:
    """Refuse what MatMulNBits cannot take: bits 4 or 8, block size a power of two ≥ 16."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two ≥ 16, got {block_size}")


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero, exactly (x − trunc(x) is exact in floating point)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits along the last axis, packed little-nibble-first for 4 bits."""
    if bits == 8:
        return values.astype(np.uint8)
    return (values[..., 0::2] & 0xF) | (values[..., 1::2] << 4)


def _onnxruntime_quantizer(bits: int) -> Any:
    try:  # what MatMulNBitsQuantizer calls; absent from onnxruntime builds without it
        from onnxruntime.capi import _pybind_state
    except ImportError:
        return None
    return getattr(_pybind_state, f"quantize_matmul_{bits}bits", None)


def quantize(
    weight: np.ndarray, *, bits: int = 4, block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = False, weight_is_transposed: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] (out × in, float) blockwise along K, as ONNX Runtime does — with
    ONNX Runtime's own quantizer when it is importable. ``weight_is_transposed``: ``weight`` is
    given as [K, N] (a Conv1D weight, or Wᵀ), the layout that quantizer reads."""
    check_params(bits, block_size)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {list(weight.shape)}")
    fast = _onnxruntime_quantizer(bits)
    if fast is None:
        return quantize_numpy(weight.T if weight_is_transposed else weight, bits=bits,
                              block_size=block_size, symmetric=symmetric)
    b = np.asarray(weight if weight_is_transposed else weight.T, dtype=np.float32)
    k, n = b.shape
    k_blocks = -(-k // block_size)
    if k_blocks * block_size != k:
        b = np.pad(b, ((0, k_blocks * block_size - k), (0, 0)))
    b = np.ascontiguousarray(b)  # the C++ code reads row-major [K, N]; np.pad keeps F order
    per_byte = 8 // bits
    packed = np.zeros((n, k_blocks, block_size // per_byte), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, -(-k_blocks // per_byte)), np.uint8)
    fast(packed, b, scales, zero_points, block_size, n, k_blocks * block_size, symmetric)
    return QuantizedWeight(packed, scales, None if symmetric else zero_points, bits, block_size, k)


def quantize_numpy(
    weight: np.ndarray, *, bits: int = 4, block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = False,
) -> QuantizedWeight:
    """:func:`quantize` in numpy, operation by operation as ONNX Runtime's C++ code does."""
    check_params(bits, block_size)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {list(weight.shape)}")
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    k_blocks = -(-k // block_size)
    if k_blocks * block_size != k:
        w = np.pad(w, ((0, 0), (0, k_blocks * block_size - k)))
    blocks = w.reshape(n, k_blocks, block_size)
    q_max = np.float32(2**bits - 1)
    mid = np.float32(2 ** (bits - 1))
    if symmetric:
        lo, hi = blocks.min(axis=2), blocks.max(axis=2)
        m = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = (-m / mid).astype(np.float32)
        zp = np.full((n, k_blocks), mid, dtype=np.float32)
    else:
        lo = np.minimum(blocks.min(axis=2), np.float32(0))
        hi = np.maximum(blocks.max(axis=2), np.float32(0))
        scales = ((hi - lo) / q_max).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp_fp = np.where(scales != 0, np.float32(0) - lo / scales, lo).astype(np.float32)
        zp = np.where(zp_fp < 0, 0, np.where(zp_fp > q_max, q_max, _roundf(zp_fp)))
        zp = zp.astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
    q = _roundf((blocks * recip[..., None] + zp[..., None]).astype(np.float32))
    q = np.clip(q, 0, q_max).astype(np.uint8)
    packed = _pack(q, bits)
    zero_points = None
    if not symmetric:
        zp8 = zp.astype(np.uint8)
        if bits == 4 and k_blocks % 2:  # the unused high nibble of the last byte stays at 8
            zp8 = np.concatenate([zp8, np.full((n, 1), 8, dtype=np.uint8)], axis=1)
        zero_points = _pack(zp8, bits)
    return QuantizedWeight(packed, scales, zero_points, bits, block_size, k)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed.astype(np.uint8)
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """The float32 weight [N, K] that MatMulNBits computes with: (q − zp) · scale."""
    values = _unpack(q.packed, q.bits).astype(np.float32)  # [N, k_blocks, block]
    n, k_blocks = q.scales.shape
    if q.zero_points is None:
        zp = np.full((n, k_blocks), 2 ** (q.bits - 1), dtype=np.float32)
    else:
        zp = _unpack(q.zero_points, q.bits)[:, :k_blocks].astype(np.float32)
    w = (values - zp[..., None]) * q.scales.astype(np.float32)[..., None]
    return w.reshape(n, k_blocks * q.block_size)[:, : q.k]


__all__ = [
    "BITS", "DEFAULT_BLOCK_SIZE", "QuantizedWeight", "check_params", "dequantize", "quantize",
    "quantize_numpy",
]
