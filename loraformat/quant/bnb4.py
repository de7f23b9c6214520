"""bitsandbytes 4-bit weights (NF4/FP4) as transformers' ``save_pretrained`` stores them.

A 4-bit ``Linear4bit`` weight ``X.weight`` is saved as (bitsandbytes ``QuantState.as_dict(packed=
True)``):

- ``X.weight``: uint8, two 4-bit code indices per byte (first value in the high nibble), shape
  (ceil(n/2), 1), n = out·in, values in row-major order;
- ``X.weight.absmax``: one scale per ``blocksize`` values — float32, or with nested ("double")
  quantization uint8 indices into ``X.weight.nested_quant_map`` (the 256-entry dynamic map),
  scaled per ``nested_blocksize`` absmax values by ``X.weight.nested_absmax`` and shifted by
  ``nested_offset`` (the mean of the absmax values);
- ``X.weight.quant_map``: the 16 code values (NF4 or FP4);
- ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``,
  ``nested_dtype``, ``nested_offset``.

Dequantization is bitsandbytes' own arithmetic in float32: value = quant_map[index]·absmax_block,
with absmax = nested_quant_map[q]·nested_absmax_block + nested_offset. Quantization follows
bitsandbytes' reference (``backends/default/ops.py``): absmax per block, values scaled by its
reciprocal and clamped to [-1, 1], then the nearest code value (bucketing at the midpoints of
the sorted code); the absmax values are quantized the same way against the dynamic map after
subtracting their mean. Blocks run over the flattened tensor; the last may be short.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..errors import LoraformatError

Where = str | os.PathLike[str] | None
STATE_SUFFIX = ".quant_state.bitsandbytes__"
#: The tensors a 4-bit weight ``X.weight`` carries besides itself, by suffix.
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


@dataclass(frozen=True)
class QuantState:
    """One 4-bit weight's quantization state, with the absmax already dequantized."""

    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    dtype: str  # the weight's float dtype before quantization ("float32", "bfloat16", ...)
    shape: tuple[int, ...]
    code: np.ndarray  # quant_map, 16 float32 values
    absmax: np.ndarray  # float32, one per block
    nested_blocksize: int | None = None
    nested_code: np.ndarray | None = None
    nested_dtype: str = "float32"

    @property
    def nested(self) -> bool:
        return self.nested_blocksize is not None


def state_key(weight: str, names: Mapping[str, object] | set[str]) -> str | None:
    """The quant_state tensor name of ``weight`` among ``names``, or None if not 4-bit."""
    for kind in ("nf4", "fp4"):
        key = f"{weight}{STATE_SUFFIX}{kind}"
        if key in names:
            return key
    return None


def aux_names(weight: str, names: Mapping[str, object] | set[str]) -> list[str]:
    """Every auxiliary tensor of ``weight`` present among ``names`` (state blob included)."""
    found = [weight + s for s in AUX_SUFFIXES if weight + s in names]
    key = state_key(weight, names)
    return found + ([key] if key else [])


def _blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _scale(values: np.ndarray, scales: np.ndarray, blocksize: int) -> np.ndarray:
    """values[i]·scales[i // blocksize] in float32, over the flattened values."""
    n = values.size
    full = n - n % blocksize
    out = np.empty(n, dtype=np.float32)
    out[:full] = (values[:full].reshape(-1, blocksize) * scales[: full // blocksize, None]).ravel()
    if full < n:
        out[full:] = values[full:] * scales[-1]
    return out


def dequantize_blockwise(q: np.ndarray, absmax: np.ndarray, code: np.ndarray,
                         blocksize: int) -> np.ndarray:
    """bitsandbytes' 8-bit blockwise dequantization: code[q]·absmax_block (float32, flat)."""
    return _scale(code.astype(np.float32)[q.reshape(-1)], absmax.astype(np.float32), blocksize)


def _nearest(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index into ``code`` of the value nearest each of ``scaled`` (ties toward the lower)."""
    order = np.argsort(code, kind="stable")
    ordered = code[order].astype(np.float32)
    bounds = (ordered[:-1] + ordered[1:]) / np.float32(2)
    return order[np.searchsorted(bounds, scaled, side="left")].astype(np.uint8)


def _absmax_scaled(flat: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(absmax per block, values scaled into [-1, 1]) as bitsandbytes computes them."""
    n = flat.size
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(body).max(axis=1) if full else np.zeros(0, np.float32)
    inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.clip(body * inv[:, None], -1, 1).ravel()
    if full < n:
        tail = flat[full:]
        am = np.maximum(np.abs(tail).max(), np.float32(1e-38))
        absmax = np.concatenate([absmax, [am]]).astype(np.float32)
        scaled = np.concatenate([scaled, np.clip(tail / am, -1, 1)])
    return absmax.astype(np.float32), scaled.astype(np.float32)


def quantize_blockwise(values: np.ndarray, code: np.ndarray,
                       blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' 8-bit blockwise quantization: (uint8 indices, float32 absmax)."""
    absmax, scaled = _absmax_scaled(np.asarray(values, np.float32).reshape(-1), blocksize)
    return _nearest(scaled, code), absmax


def read_state(tensors: Mapping[str, np.ndarray], weight: str, where: Where = None) -> QuantState:
    """The quantization state of ``weight`` from its auxiliary tensors (``tensors[name]`` gives
    an array; only the ones named above are read)."""
    key = state_key(weight, tensors)
    if key is None:
        raise LoraformatError(where, f"{weight}: no bitsandbytes 4-bit quant_state tensor")
    try:
        blob = json.loads(bytes(np.asarray(tensors[key], np.uint8).reshape(-1)).decode("utf-8"))
        quant_type = str(blob["quant_type"])
        blocksize = int(blob["blocksize"])
        shape = tuple(int(d) for d in blob["shape"])
        dtype = str(blob.get("dtype", "float32")).removeprefix("torch.")
    except (ValueError, KeyError, TypeError) as exc:
        raise LoraformatError(where, f"{key}: not a bitsandbytes quant_state ({exc})") from None
    if quant_type not in ("nf4", "fp4") or blocksize <= 0:
        raise LoraformatError(where, f"{key}: quant_type {quant_type!r}, blocksize {blocksize}: "
                              "only 4-bit nf4/fp4 is supported")
    missing = [weight + s for s in (".absmax", ".quant_map") if weight + s not in tensors]
    nested = "nested_blocksize" in blob
    if nested:
        missing += [weight + s for s in (".nested_absmax", ".nested_quant_map")
                    if weight + s not in tensors]
    if missing:
        raise LoraformatError(where, f"{weight}: 4-bit weight lacks {', '.join(missing)}")
    code = np.asarray(tensors[weight + ".quant_map"], np.float32).reshape(-1)
    raw_absmax = np.asarray(tensors[weight + ".absmax"]).reshape(-1)
    n_blocks = _blocks(int(np.prod(shape)), blocksize)
    if code.size != 16 or raw_absmax.size != n_blocks:
        raise LoraformatError(where, f"{weight}: quant_map has {code.size} values (16 expected), "
                              f"absmax {raw_absmax.size} ({n_blocks} blocks expected)")
    if not nested:
        return QuantState(quant_type, blocksize, dtype, shape, code,
                          raw_absmax.astype(np.float32))
    nested_blocksize = int(blob["nested_blocksize"])
    nested_code = np.asarray(tensors[weight + ".nested_quant_map"], np.float32).reshape(-1)
    nested_absmax = np.asarray(tensors[weight + ".nested_absmax"], np.float32).reshape(-1)
    if raw_absmax.dtype != np.uint8 or nested_absmax.size != _blocks(n_blocks, nested_blocksize):
        raise LoraformatError(where, f"{weight}: nested absmax does not fit the quant_state")
    absmax = dequantize_blockwise(raw_absmax, nested_absmax, nested_code, nested_blocksize)
    absmax += np.float32(blob["nested_offset"])
    return QuantState(quant_type, blocksize, dtype, shape, code, absmax, nested_blocksize,
                      nested_code, str(blob.get("nested_dtype", "float32")))


def dequantize(packed: np.ndarray, state: QuantState) -> np.ndarray:
    """The float32 weight (``state.shape``) of a packed 4-bit tensor."""
    data = np.asarray(packed).reshape(-1).view(np.uint8)
    n = int(np.prod(state.shape))
    if data.size != _blocks(n, 2):
        raise ValueError(f"packed 4-bit tensor has {data.size} bytes, {_blocks(n, 2)} expected")
    index = np.empty(data.size * 2, dtype=np.uint8)
    index[0::2] = data >> 4
    index[1::2] = data & 0x0F
    values = state.code[index[:n]]
    return _scale(values, state.absmax, state.blocksize).reshape(state.shape)


def quantize(values: np.ndarray, state: QuantState) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``values`` (``state.shape``) quantized like ``state`` (same type, code, block sizes,
    nesting): (packed uint8 of shape (ceil(n/2), 1), the auxiliary tensors by suffix, JSON
    blob included under ``"quant_state"``)."""
    flat = np.asarray(values, np.float32).reshape(-1)
    absmax, scaled = _absmax_scaled(flat, state.blocksize)
    index = _nearest(scaled, state.code)
    if index.size % 2:
        index = np.concatenate([index, _nearest(np.zeros(1, np.float32), state.code)])
    packed = ((index[0::2] << 4) | index[1::2]).astype(np.uint8).reshape(-1, 1)
    blob: dict[str, object] = {
        "quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": state.dtype,
        "shape": list(state.shape),
    }
    aux: dict[str, np.ndarray] = {".quant_map": state.code.astype(np.float32)}
    if state.nested:
        assert state.nested_code is not None and state.nested_blocksize is not None
        offset = np.float32(absmax.mean(dtype=np.float32))
        q, nested_absmax = quantize_blockwise(absmax - offset, state.nested_code,
                                              state.nested_blocksize)
        aux[".absmax"] = q
        aux[".nested_absmax"] = nested_absmax
        aux[".nested_quant_map"] = state.nested_code.astype(np.float32)
        blob.update(nested_blocksize=state.nested_blocksize, nested_dtype=state.nested_dtype,
                    nested_offset=float(offset))
    else:
        aux[".absmax"] = absmax
    aux["quant_state"] = np.frombuffer(json.dumps(blob).encode("utf-8"), dtype=np.uint8).copy()
    return packed, aux


def requantized_state(aux: Mapping[str, np.ndarray], state: QuantState) -> QuantState:
    """The state :func:`quantize` described in ``aux`` (to dequantize what it wrote)."""
    if not state.nested:
        return replace(state, absmax=aux[".absmax"])
    blob = json.loads(bytes(aux["quant_state"]).decode("utf-8"))
    assert state.nested_code is not None and state.nested_blocksize is not None
    absmax = dequantize_blockwise(aux[".absmax"], aux[".nested_absmax"], state.nested_code,
                                  state.nested_blocksize) + np.float32(blob["nested_offset"])
    return replace(state, absmax=absmax)


__all__ = [
    "AUX_SUFFIXES",
    "QuantState",
    "aux_names",
    "dequantize",
    "dequantize_blockwise",
    "quantize",
    "quantize_blockwise",
    "read_state",
    "requantized_state",
    "state_key",
]
