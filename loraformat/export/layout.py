"""The weight-layout step of an emitted decoder (:mod:`.emitter`): checkpoint tensors, merged
through the plan, in the layout the graph's kernels read.

Each function returns one initializer's value when it is written, reading only the checkpoint
tensors it needs (:func:`.stream.merged_array`, fp32 accumulation as a merged checkpoint holds
them), so the packed and transposed weights stream like any other: nothing holds the model.

* q/k/v rows are packed into one weight ([q; k; v] along the out-features), so one
  ``MatMul``/``MatMulNBits`` computes all three; an adapter merged into one of them is merged
  before packing, exactly as into the checkpoint.
* float ``MatMul`` weights are written transposed ([in, out], what ``MatMul(x, W)`` reads).
* Gemma's ``(1 + w)`` norm weights are written as ``1 + w`` (the norm kernel multiplies by w).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..checkpoint import Checkpoint
from ..merge.plan import MergePlan
from .quantize import transposed
from .stream import merged_array

#: The prefix ``*ForCausalLM`` checkpoints put the decoder under (absent in a bare ``*Model``).
DECODER_PREFIX = "model."


class WeightSource:
    """The merged tensors of one checkpoint, in fp32, by name."""

    def __init__(self, checkpoint: Checkpoint, plan: MergePlan | None) -> None:
        self.checkpoint, self.plan = checkpoint, plan
        self.prefix = DECODER_PREFIX if DECODER_PREFIX + "embed_tokens.weight" in checkpoint \
            else ""

    def has(self, name: str) -> bool:
        return name in self.checkpoint

    def read(self, name: str) -> np.ndarray:
        """One tensor as the merged checkpoint holds it, in fp32."""
        return merged_array(self.checkpoint, name, self.plan, np.dtype(np.float32))


def packed_rows(source: WeightSource, names: Sequence[str]) -> np.ndarray:
    """The tensors ``names`` (each merged) stacked along their first axis: packed biases (or
    one tensor as it is)."""
    if len(names) == 1:
        return source.read(names[0])
    return np.concatenate([source.read(n) for n in names], axis=0)


def packed_transposed(source: WeightSource, names: Sequence[str]) -> np.ndarray:
    """The weights ``names`` ([out_i, in] each, merged) packed along out and transposed:
    [in, Σ out_i], each written straight into its columns (one pass, no packed copy)."""
    shapes = [tuple(source.checkpoint.info(n).shape) for n in names]
    out = np.empty((shapes[0][1], sum(s[0] for s in shapes)), np.float32)
    column = 0
    for name, (rows, _) in zip(names, shapes, strict=True):
        transposed(source.read(name), out[:, column:column + rows])
        column += rows
    return out


def plus_one(weight: np.ndarray) -> np.ndarray:
    """Gemma's norm weight ``1 + w`` in fp32 (the norm scales by it)."""
    return np.asarray(weight, np.float32) + np.float32(1.0)


__all__ = ["DECODER_PREFIX", "WeightSource", "packed_rows", "packed_transposed", "plus_one"]
