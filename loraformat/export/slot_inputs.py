"""The graph inputs of LoRA slots, shared by the slot exports (:mod:`.slots`) and the emitted
slot decoders (:mod:`.decoder`): their names and their zero-rank defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import LoraformatError

SLOT_A, SLOT_B = ".lora_A", ".lora_B"


def slot_input_names(path: str) -> tuple[str, str]:
    """The graph input names of a layer's slot (equal to the ``.onnx_adapter`` parameter names)."""
    return path + SLOT_A, path + SLOT_B


def add_slot_defaults(model: Any, paths: Sequence[str]) -> None:
    """Give every slot input of the onnx_ir ``model`` a same-named zero-rank initializer.

    A is [in, 0], B is [0, out]. ONNX Runtime rejects a run that omits a graph input without a
    default, and rejects adapter parameters that are not graph inputs; a zero-rank default
    satisfies both and makes the adapter term an empty sum.
    """
    import onnx_ir as ir

    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    for path in paths:
        for name, zero_axis in zip(slot_input_names(path), (1, 0), strict=True):
            value = inputs.get(name)
            if value is None:
                raise LoraformatError(None, f"the exported graph has no input {name}")
            dims = list(value.shape)
            fixed = dims[1 - zero_axis]
            if len(dims) != 2 or not isinstance(fixed, int):
                raise LoraformatError(None, f"graph input {name} has no static feature size")
            shape = [0, 0]
            shape[1 - zero_axis] = fixed
            if name in graph.initializers:
                continue
            value.const_value = ir.tensor(np.zeros(shape, value.dtype.numpy()), name=name)
            graph.register_initializer(value)


__all__ = ["SLOT_A", "SLOT_B", "add_slot_defaults", "slot_input_names"]
