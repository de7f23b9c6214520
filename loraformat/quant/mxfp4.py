"""MXFP4 expert weights as published gpt-oss checkpoints store them (OCP microscaling FP4).

A stacked expert parameter ``X`` (gpt-oss: ``…mlp.experts.gate_up_proj`` [E, H, 2I] and
``…down_proj`` [E, I, H], input axis first) is stored as two uint8 tensors over its transpose
[E, out, in]:

- ``X_blocks`` [E, out, in/32, 16]: each 32-value block of a row as 16 bytes, two FP4 (E2M1)
  codes per byte, the even element in the low nibble, the odd one in the high nibble;
- ``X_scales`` [E, out, in/32]: one E8M0 exponent per block, biased by 127.

A code's bit 3 is the sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; the value
is magnitude · 2^(scale − 127) (transformers' ``integrations/mxfp4.py`` dequantizes so).

Quantization picks, per block, the smallest exponent whose 6 · 2^e covers the block's largest
magnitude (no value clips) and rounds each value to the nearest FP4 magnitude (ties to the
smaller). A block already on the grid keeps its values (its exponent may drop where its largest
code is below 6, the codes doubling), so an untouched weight requantizes to itself. Numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LoraformatError

BLOCK = 32
BIAS = 127
MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
#: The 16 code values, sign bit included.
VALUES = np.concatenate([MAGNITUDES, -MAGNITUDES])
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def parameter_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stacked parameter's shape [..., in, out] for blocks of shape [..., out, in/32, 16]."""
    *prefix, out, groups, width = blocks_shape
    return (*prefix, groups * width * 2, out)


def check_pair(
    blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...], where: Path | None, name: str
) -> None:
    """Refuse a ``_blocks``/``_scales`` pair that is not MXFP4's layout, in one line."""
    if len(blocks_shape) < 3 or blocks_shape[-1] != BLOCK // 2 \
            or tuple(blocks_shape[:-1]) != tuple(scales_shape):
        raise LoraformatError(
            where, f"{name}: MXFP4 blocks {list(blocks_shape)} and scales {list(scales_shape)} "
            f"are not [..., out, in/{BLOCK}, {BLOCK // 2}] and [..., out, in/{BLOCK}]",
        )


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 parameter [..., in, out] that ``blocks`` and ``scales`` store."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    codes = np.empty((*blocks.shape[:-1], BLOCK), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    exponents = np.asarray(scales, dtype=np.int32) - BIAS
    values = np.ldexp(VALUES[codes], exponents[..., None])
    *prefix, out, groups, _ = codes.shape
    return np.ascontiguousarray(np.swapaxes(values.reshape(*prefix, out, groups * BLOCK), -1, -2))


def quantize(parameter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, scales) storing the float parameter [..., in, out] (in a multiple of 32)."""
    rows = np.swapaxes(np.asarray(parameter, dtype=np.float32), -1, -2)
    *prefix, out, width = rows.shape
    if width % BLOCK:
        raise ValueError(f"MXFP4 needs the input axis a multiple of {BLOCK}, not {width}")
    values = rows.reshape(*prefix, out, width // BLOCK, BLOCK)
    largest = np.abs(values).max(axis=-1)
    with np.errstate(divide="ignore"):
        exponent = np.ceil(np.log2(largest / MAGNITUDES[-1]))
    exponent = np.clip(np.where(largest > 0, exponent, -BIAS), -BIAS, 254 - BIAS).astype(np.int32)
    scaled = np.abs(np.ldexp(values, -exponent[..., None]))
    # nearest magnitude: count the midpoints below (a tie goes to the smaller magnitude)
    midpoints = (MAGNITUDES[1:] + MAGNITUDES[:-1]) / 2
    index = np.searchsorted(midpoints, np.minimum(scaled, MAGNITUDES[-1]), side="left")
    codes = (index | (np.signbit(values) & (index > 0)) << 3).astype(np.uint8)
    blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).astype(np.uint8)
    return blocks, (exponent + BIAS).astype(np.uint8)


__all__ = ["BLOCKS_SUFFIX", "SCALES_SUFFIX", "check_pair", "dequantize", "parameter_shape",
           "quantize"]
