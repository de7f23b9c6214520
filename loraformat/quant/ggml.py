"""GGUF tensor types: dequantize any type gguf-py can, quantize the ones gguf-py implements.

gguf-py (``gguf.quants``) is llama.cpp's own Python port of its block formats, so it is the
reference here rather than a re-implementation: dequantization covers every type it knows (the
k-quants and i-quants included), quantization the types it implements — F32, F16, BF16, Q8_0,
Q5_1, Q5_0, Q4_1, Q4_0. A k-quant (Q4_K...) is refused as an *output* type with one line naming
the alternatives; reading one is fine, so a Q4_K_M model can be merged with ``--type Q8_0``.

Arrays are numpy in row-major order: a GGUF tensor with ne [in, out] is (out, in) here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import LoraformatError

#: Output types gguf-py can quantize to, finest first (the order messages list them in).
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
Where = str | os.PathLike[str] | None


def _gguf() -> Any:
    import gguf

    return gguf


def qtype(name: str | Any, where: Where = None) -> Any:
    """The ``GGMLQuantizationType`` named ``name`` (case-insensitive), or it unchanged."""
    gguf = _gguf()
    if isinstance(name, gguf.GGMLQuantizationType):
        return name
    try:
        return gguf.GGMLQuantizationType[str(name).upper()]
    except KeyError:
        raise LoraformatError(
            where, f"unknown GGUF type {name!r} (writable types: {', '.join(QUANTIZABLE)})"
        ) from None


def block_size(kind: Any) -> int:
    """Elements per block (1 for F32/F16/BF16)."""
    return int(_gguf().GGML_QUANT_SIZES[qtype(kind)][0])


def nbytes(kind: Any, shape: Sequence[int]) -> int:
    """Bytes a tensor of ``shape`` (numpy order) takes in type ``kind``."""
    size, type_size = _gguf().GGML_QUANT_SIZES[qtype(kind)]
    return int(np.prod(shape, dtype=np.int64)) // size * type_size


def check_writable(kind: Any, shape: Sequence[int], where: Where, tensor: str) -> None:
    """Refuse, before anything is written, an output type gguf-py cannot quantize to, or a row
    length that is not a whole number of blocks."""
    kind = qtype(kind, where)
    if kind.name not in QUANTIZABLE:
        raise LoraformatError(
            where,
            f"{tensor}: cannot write GGUF type {kind.name} (no quantizer for it here; gguf-py "
            f"quantizes {', '.join(QUANTIZABLE)}): choose one with --type, e.g. --type Q8_0, "
            "or keep the adapter separate (llama.cpp --lora)",
        )
    size = block_size(kind)
    if shape and shape[-1] % size:
        raise LoraformatError(
            where, f"{tensor}: rows of {shape[-1]} values are not a whole number of {kind.name} "
            f"blocks ({size} values); choose another --type",
        )


def dequantize(raw: np.ndarray, kind: Any, shape: Sequence[int], where: Where = None) -> np.ndarray:
    """float32 values of a tensor stored as ``raw`` bytes of type ``kind`` with ``shape``."""
    gguf = _gguf()
    kind = qtype(kind, where)
    shape = tuple(int(d) for d in shape)
    data = np.frombuffer(np.ascontiguousarray(raw).reshape(-1).view(np.uint8), dtype=np.uint8)
    if data.size != nbytes(kind, shape):
        raise LoraformatError(where, f"{kind.name} tensor of shape {list(shape)} needs "
                              f"{nbytes(kind, shape)} bytes, got {data.size}")
    if kind == gguf.GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(shape).copy()
    if kind == gguf.GGMLQuantizationType.F16:
        return data.view(np.float16).reshape(shape).astype(np.float32)
    byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
    try:
        values = gguf.quants.dequantize(data.reshape(byte_shape), kind)
    except NotImplementedError:
        raise LoraformatError(
            where, f"GGUF type {kind.name} cannot be dequantized (gguf-py has no codec for it)"
        ) from None
    return np.asarray(values, dtype=np.float32).reshape(shape)


def quantize(values: np.ndarray, kind: Any, where: Where = None) -> np.ndarray:
    """The bytes (flat uint8) of ``values`` stored in type ``kind``, as llama.cpp would."""
    gguf = _gguf()
    kind = qtype(kind, where)
    check_writable(kind, values.shape, where, "tensor")
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = gguf.quants.quantize(values, kind)
    return np.ascontiguousarray(out).reshape(-1).view(np.uint8)


__all__ = [
    "QUANTIZABLE",
    "block_size",
    "check_writable",
    "dequantize",
    "nbytes",
    "qtype",
    "quantize",
]
