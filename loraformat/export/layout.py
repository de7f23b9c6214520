"""The weight-layout step of an emitted decoder (:mod:`.emitter`): checkpoint tensors, merged
through the plan, in the layout the graph's kernels read.

Each function returns one initializer's value when it is written, reading only the checkpoint
tensors it needs (:func:`.stream.merged_array`, fp32 accumulation as a merged checkpoint holds
them), so the packed and transposed weights stream like any other: nothing holds the model.

* q/k/v (and gate/up) rows are packed into one weight ([q; k; v] along the out-features), so one
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

    @staticmethod
    def transposed(weight: np.ndarray) -> np.ndarray:
        """[out, in] → [in, out], C-contiguous (:func:`.quantize.transposed`)."""
        return transposed(weight)


def packed_rows(source: WeightSource, names: Sequence[str]) -> np.ndarray:
    """The tensors ``names`` (each merged) stacked along their first axis: packed q/k/v or
    gate/up weights ([out, in] each) or biases. One name: that tensor (already packed)."""
    if len(names) == 1:
        return source.read(names[0])
    parts = [source.read(n) for n in names]
    return np.concatenate(parts, axis=0)


def plus_one(weight: np.ndarray) -> np.ndarray:
    """Gemma's norm weight ``1 + w`` in fp32 (the norm scales by it)."""
    return np.asarray(weight, np.float32) + np.float32(1.0)


__all__ = ["DECODER_PREFIX", "WeightSource", "packed_rows", "plus_one"]
