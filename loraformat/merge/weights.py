"""The merge arithmetic for one weight: W' = W + Σ wᵢ·scaleᵢ·BᵢAᵢ in the base's storage layout.

Everything here is numpy on arrays already in memory; reading and writing checkpoints is
:mod:`loraformat.merge.checkpoint`'s job, and checking that an adapter fits a base is
:mod:`loraformat.merge.plan`'s.

Orientation: an adapter is in math orientation (A is r×in, B is rows×r, ΔW = scale·B·A is
out×in). A base weight stored ``out_in`` (nn.Linear) takes ΔW as is; one stored ``in_out``
(GPT-2 Conv1D, embedding tables) takes ΔWᵀ = scale·Aᵀ·Bᵀ, which is computed directly so no dense
out×in temporary is ever transposed. A stack of expert weights [E, …] (an adapter layer with
``experts``) takes each expert's update in its own slice, in the same layout.

Precision: the sum is accumulated in float32 (float64 for a float64 base) and cast back to the
base dtype once, at the end, so several adapters round once, not once each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..format.adapter import LoraLayer

#: Elements per block when adding a low-rank product (64 KiB of fp32). Small on purpose: the
#: product stays in L2 cache for the add, and BLAS runs each block on one thread — its threaded
#: path for mid-sized skinny products was 10-30x slower on a busy 2-core machine.
BLOCK_ELEMENTS = 1 << 14


@dataclass(frozen=True)
class Contribution:
    """One adapter's layer as it enters a merge.

    ``scale`` is the adapter's alpha/r (or alpha/√r), ``weight`` the user's weight for this
    adapter, ``sign`` +1 to merge and -1 to unmerge; B·A is multiplied by their product.
    """

    layer: LoraLayer
    scale: float
    weight: float = 1.0
    sign: int = 1

    @property
    def factor(self) -> float:
        return self.sign * self.weight * self.scale

    @property
    def dora(self) -> bool:
        return self.layer.magnitude is not None


def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """float64 for a float64 base, float32 for everything else (F32, F16, BF16)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def add_low_rank(acc: np.ndarray, layout: str, a: np.ndarray, b_scaled: np.ndarray,
                 out_rows: Sequence[tuple[int, int]] | None,
                 source: np.ndarray | None = None) -> None:
    """``acc += B·A`` (``out_in``) or ``acc += (B·A)ᵀ`` (``in_out``), in place, blockwise.

    ``b_scaled`` already carries the factor. With ``out_rows`` B's rows land only in those output
    rows (columns of an ``in_out`` weight), consecutively. The product is formed one block of
    stored rows at a time in a reused scratch buffer, so no dense ΔW is ever allocated. With
    ``source`` (same shape), ``acc = source + product`` instead: the copy is fused into the add,
    so streaming reads each weight once.
    """
    if source is not None and out_rows:
        np.copyto(acc, source)
        source = None
    out_features = acc.shape[0] if layout == "out_in" else acc.shape[1]
    ranges = list(out_rows) if out_rows else [(0, out_features)]
    a = np.ascontiguousarray(a, dtype=acc.dtype)
    a_t = np.ascontiguousarray(a.T)
    offset = 0
    for start, stop in ranges:
        part = np.ascontiguousarray(b_scaled[offset : offset + (stop - start)], dtype=acc.dtype)
        offset += stop - start
        if layout == "out_in":
            left, right, target = part, a, acc[start:stop]
        else:
            left, right, target = a_t, np.ascontiguousarray(part.T), acc[:, start:stop]
        first = target if source is None else source  # no out_rows here: the whole tensor
        blocks = _row_blocks(target.shape[0], target.shape[1])
        scratch = np.empty((blocks[0][1] - blocks[0][0], target.shape[1]), dtype=acc.dtype)
        for i, j in blocks:
            product = scratch[: j - i]
            np.matmul(left[i:j], right, out=product)
            np.add(first[i:j], product, out=target[i:j])


def _dora(acc: np.ndarray, layout: str, magnitude: np.ndarray) -> None:
    """W' = (m / ‖V‖_row)·V in place, rows being output rows (math orientation)."""
    math_view = acc if layout == "out_in" else acc.T
    norms = np.sqrt(np.einsum("ij,ij->i", math_view, math_view, dtype=np.float64))
    # spec §4.5: a zero row of V stays zero (m/0·0 would be NaN)
    factor = np.divide(magnitude.astype(np.float64), norms, out=np.zeros_like(norms),
                       where=norms > 0).astype(acc.dtype)
    math_view *= factor[:, None]


def merge_weight(
    weight: np.ndarray,
    layout: str,
    contributions: Sequence[Contribution],
    *,
    inplace: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The merged weight, in ``weight``'s layout and dtype.

    ``weight`` is not modified unless ``inplace`` is set and it is a writable C-contiguous array
    of the accumulator dtype (float32/float64), in which case it is updated and returned, saving
    a copy of the largest tensor when streaming. ``out`` (a C-contiguous array of the accumulator
    dtype and ``weight``'s shape, for a base of that dtype) receives the result instead, and
    ``weight`` may then be read-only (a memory map).

    Contributions apply in order. A plain LoRA contribution adds ``factor·B·A``. A DoRA
    contribution with user weight w computes V = W + scale·B·A and D = (m/‖V‖_row)·V (PEFT's
    merge, norm over each output row of the merged weight) and yields W + w·(D − W): w = 1 is
    exactly PEFT's DoRA merge, w = 0 leaves W, and the result is linear in w, as for plain LoRA.
    DoRA cannot be undone from the merged weight alone (the row norms of V are lost), so callers
    refuse to unmerge it.
    """
    acc_dtype = accumulator_dtype(weight.dtype)
    pending: np.ndarray | None = None  # the weight still to be copied into ``out``
    if out is not None:
        if out.dtype != acc_dtype or out.shape != weight.shape or not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous, of the accumulator dtype, weight's shape")
        acc, pending = out, weight
    elif (
        inplace
        and weight.dtype == acc_dtype
        and weight.flags.c_contiguous
        and weight.flags.writeable
    ):
        acc = weight
    else:
        acc = np.array(weight, dtype=acc_dtype, copy=True, order="C")
    for item in contributions:
        layer = item.layer
        a = np.asarray(layer.A).astype(acc_dtype, copy=False)
        if item.dora:
            if pending is not None:
                np.copyto(acc, pending)
                pending = None
            if item.sign < 0:
                raise ValueError("a DoRA merge cannot be undone from the merged weight")
            b_scaled = np.asarray(layer.B).astype(acc_dtype) * acc_dtype.type(item.scale)
            before = acc.copy() if item.weight != 1.0 else None
            add_low_rank(acc, layout, a, b_scaled, layer.out_rows)
            _dora(acc, layout, np.asarray(layer.magnitude))
            if before is not None:
                acc -= before
                acc *= acc_dtype.type(item.weight)
                acc += before
        else:
            b_scaled = np.asarray(layer.B).astype(acc_dtype) * acc_dtype.type(item.factor)
            if layer.experts is None:
                add_low_rank(acc, layout, a, b_scaled, layer.out_rows, source=pending)
            else:  # a stack [E, …]: each expert's weight takes its own B[e]·A[e]
                for e in range(layer.experts):
                    add_low_rank(acc[e], layout, a[e], b_scaled[e], layer.out_rows,
                                 source=None if pending is None else pending[e])
            pending = None
    if pending is not None:
        np.copyto(acc, pending)
    return acc.astype(weight.dtype, copy=False)


def merge_bias(bias: np.ndarray, contributions: Sequence[Contribution]) -> np.ndarray:
    """bias + Σ factorᵢ·lora_biasᵢ over the contributions that carry a ``lora_bias``."""
    acc_dtype = accumulator_dtype(bias.dtype)
    acc = np.array(bias, dtype=acc_dtype, copy=True)
    for item in contributions:
        if item.layer.lora_bias is not None:
            acc += np.asarray(item.layer.lora_bias).astype(acc_dtype) * acc_dtype.type(item.factor)
    return acc.astype(bias.dtype, copy=False)


__all__ = [
    "Contribution",
    "accumulator_dtype",
    "add_low_rank",
    "merge_bias",
    "merge_weight",
]
