"""Blockwise int4 embedding tables for ONNX Runtime's ``GatherBlockQuantized`` (``com.microsoft``).

The table ``E`` [rows, dim] is quantized along ``dim`` (``quantize_axis`` = 1) in blocks of
``block_size``, as ONNX Runtime's own quantizer writes it for a ``Gather``
(``DefaultWeightOnlyQuantizer.quantize_ndarray``); its rules differ from MatMulNBits' C++ kernel
(:mod:`.matmulnbits`), and these are the ones reproduced here, bit for bit:

* asymmetric (default): ``lo = min(block, 0)``, ``hi = max(block, 0)``, ``scale = (hi − lo) / 15``,
  ``zp = round(−lo / scale)`` clipped to [0, 15] (8 where ``scale`` is 0), ``q = round(x / scale
  + zp)`` clipped to [0, 15] (8 where ``scale`` is 0); data and zero points are ``UINT4``;
* symmetric: ``m`` = the block's extreme of larger magnitude, ``scale = m / −8``, ``q = round(x /
  scale)`` clipped to [−8, 7] (0 where ``scale`` is 0), data ``INT4``, no zero points;

``round`` is numpy's (halves to even), arithmetic in the table's float dtype. Dequantized:
``(q − zp) · scale``, which is what the kernel computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedTable:
    """One embedding table in ``GatherBlockQuantized`` form."""

    data: np.ndarray  # uint8 values 0..15 (asymmetric) or int8 −8..7 (symmetric), [rows, dim]
    scales: np.ndarray  # [rows, dim / block_size], the table's float dtype
    zero_points: np.ndarray | None  # uint8 0..15 [rows, dim / block_size]; None when symmetric
    block_size: int


def quantize_table(table: np.ndarray, block_size: int, symmetric: bool = False) -> QuantizedTable:
    """Quantize ``table`` [rows, dim] to int4 along ``dim``; ``dim`` must be a multiple of
    ``block_size`` (a power of two ≥ 16)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two ≥ 16, got {block_size}")
    if table.ndim != 2 or table.shape[1] % block_size:
        raise ValueError(
            f"an embedding table [rows, dim] with dim a multiple of {block_size} is needed, "
            f"got shape {list(table.shape)}"
        )
    rows, dim = table.shape
    blocks = table.reshape(rows, dim // block_size, block_size)
    hi, lo = blocks.max(axis=2, keepdims=True), blocks.min(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8.0
            q = np.where(scale == 0, 0, blocks / scale).round().clip(-8, 7).astype(np.int8)
            zero_points = None
        else:
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
            scale = (hi - lo) / 15.0
            zp = np.where(scale == 0, 8, -lo / scale).round().clip(0, 15).astype(np.uint8)
            q = np.where(scale == 0, 8, blocks / scale + zp).round().clip(0, 15).astype(np.uint8)
            zero_points = zp.reshape(rows, -1)
    return QuantizedTable(q.reshape(rows, dim), scale.reshape(rows, -1), zero_points, block_size)


def dequantize_table(q: QuantizedTable) -> np.ndarray:
    """The table ``GatherBlockQuantized`` gathers from: ``(q − zp) · scale``."""
    rows, dim = q.data.shape
    values = q.data.reshape(rows, -1, q.block_size).astype(np.float32)
    zp = 0.0 if q.zero_points is None else q.zero_points.astype(np.float32)[..., None]
    out = (values - zp) * q.scales.astype(np.float32)[..., None]
    return out.reshape(rows, dim)


__all__ = ["QuantizedTable", "dequantize_table", "quantize_table"]
