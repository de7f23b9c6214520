"""Merging adapters into a checkpoint whose expert weights are MXFP4 (published gpt-oss: each
stacked ``…mlp.experts.X`` stored as ``X_blocks`` and ``X_scales``, :mod:`loraformat.quant.mxfp4`;
``quantization_config.quant_method`` "mxfp4").

Every MXFP4 parameter is dequantized exactly as transformers does and seen under its float name
and shape (:class:`~loraformat.checkpoint.Mxfp4Checkpoint`), so the plan is a float checkpoint's;
then, as for a bitsandbytes base (:mod:`.bnb`), either

- written in the checkpoint's float dtype (the default: every MXFP4 parameter dequantized,
  ``quantization_config`` dropped, a plain checkpoint transformers loads without MXFP4 kernels);
- or with ``requantize`` the merged parameters quantized to MXFP4 again (untouched ones keep their
  bytes), with the survival report of what MXFP4 kept of each.

Streamed one tensor at a time; shards, index and side files carried over; output atomic.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import check_output
from ..checkpoint import Checkpoint, Mxfp4Checkpoint
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ..format.safetensors_io import DTYPES, TensorEntry
from ..quant import mxfp4
from ..quant.survival import DEFAULT_THRESHOLD, SurvivalReport, measure
from .bnb import BnbMergeResult, cast, plan_quantized, quant_config, raw_entry, write_merged
from .plan import MergePlan, open_adapters

Progress = Callable[[int, int], None]
ADVICE = (
    "write the float checkpoint instead (omit --requantize), or keep the adapter separate"
)
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def is_mxfp4(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint directory whose config says MXFP4 (gpt-oss)."""
    return quant_config(Path(path), "mxfp4") is not None


def _float_dtype(ckpt: Checkpoint, stem: str) -> str:
    """The dtype a dequantized parameter is written in: its bias's (gpt-oss keeps the expert
    biases in the model's dtype), else the config's, else float32."""
    bias = stem + "_bias"
    if bias in ckpt:
        return ckpt.info(bias).dtype
    said = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    return _DTYPES.get(str(said), "F32")


def merge_mxfp4(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    requantize: bool = False,
    threshold: float | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BnbMergeResult:
    """Merge ``adapters`` into the MXFP4 checkpoint directory ``base``, writing the directory
    ``out``: a float checkpoint, or with ``requantize`` MXFP4 experts again."""
    where = Path(base)
    if quant_config(where, "mxfp4") is None:
        raise LoraformatError(where, "not an MXFP4 checkpoint directory (config.json has no "
                              "quantization_config with quant_method 'mxfp4')")
    target = check_output(out, overwrite)
    if target.resolve() == where.resolve():
        raise LoraformatError(target, "output is the base itself; inputs are never modified")
    report = SurvivalReport(threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                            advice=ADVICE) if requantize else None
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Mxfp4Checkpoint(where))
        opened = open_adapters(stack, adapters)
        plan = plan_quantized(ckpt, ckpt.shapes(), opened, where, weights, force,
                              allow_nonfinite)
        write_merged(where, target, ckpt, plan, requantize, progress,
                     lambda name, step: _entries(ckpt, plan, name, requantize, report, step))
        return BnbMergeResult(target, plan.layer_count, len(plan.ops), len(ckpt.shards),
                              requantize, report)


def _entries(ckpt: Mxfp4Checkpoint, plan: MergePlan, name: str, requantize: bool,
             report: SurvivalReport | None, step: Callable[[], None]) -> list[TensorEntry]:
    """The output tensors for input tensor ``name``: an MXFP4 pair is written at its blocks
    (as one float parameter, or as blocks and scales again), a float tensor as it is or merged."""
    stem = ckpt.packed.get(name)
    if stem is None:
        op = plan.ops.get(name)
        if op is None:
            return [raw_entry(ckpt, name)]
        info = ckpt.info(name)

        def merged_plain() -> np.ndarray:
            step()
            return np.ascontiguousarray(op.apply(ckpt.numpy(name)))

        return [TensorEntry(name, info.dtype, tuple(info.shape), merged_plain)]
    op = plan.ops.get(stem)
    if requantize and op is None:
        return [raw_entry(ckpt, name)]
    if not name.endswith(mxfp4.BLOCKS_SUFFIX):
        return []  # the scales: written with the blocks, or dropped
    if not requantize:
        dtype = _float_dtype(ckpt, stem)
        shape = ckpt.mxfp4[stem]

        def dequantized() -> np.ndarray:
            w = ckpt.numpy(stem)
            if op is None:
                return cast(w, dtype)
            step()
            return cast(op.apply(w, inplace=True), dtype)

        return [TensorEntry(stem, dtype, shape, dequantized)]
    assert op is not None and report is not None
    w = ckpt.numpy(stem)
    figures, (blocks, scales) = measure(
        stem, w, np.asarray(op.apply(w), dtype=np.float32), mxfp4.quantize,
        lambda q: mxfp4.dequantize(*q), qtype="MXFP4", stored=w,
    )
    report.add(figures)
    step()
    return [TensorEntry.of(name, blocks),
            TensorEntry.of(stem + mxfp4.SCALES_SUFFIX, scales.astype(DTYPES["U8"]))]


__all__ = ["is_mxfp4", "merge_mxfp4"]
