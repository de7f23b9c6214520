"""bitsandbytes 4-bit layout details that hold without bitsandbytes installed (its own kernels are
the reference in test_merge_bnb.py): nibble order, the short last block, nested absmax."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loraformat.errors import LoraformatError
from loraformat.quant import bnb4

# bitsandbytes' NF4 code (functional.get_4bit_type("nf4")), sorted ascending
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def _state(shape, nested: bool, blocksize: int = 64) -> bnb4.QuantState:
    n_blocks = -(-int(np.prod(shape)) // blocksize)
    if not nested:
        return bnb4.QuantState("nf4", blocksize, "float32", tuple(shape), NF4,
                               np.ones(n_blocks, np.float32))
    dynamic = np.linspace(-1, 1, 256, dtype=np.float32)
    return bnb4.QuantState("nf4", blocksize, "float32", tuple(shape), NF4,
                           np.ones(n_blocks, np.float32), 256, dynamic)


def test_nibble_order_and_short_block():
    values = np.array([[1.0, -1.0, 0.0], [0.5, -0.5, 2.0]], np.float32)  # 6 values, one block
    packed, aux = bnb4.quantize(values, _state(values.shape, False))
    assert packed.shape == (3, 1)
    # first value in the high nibble: 1.0/2 → index 13 (0.5626), -1/2 → 2 (-0.525)
    assert packed[0, 0] >> 4 == np.argmin(np.abs(NF4 - 0.5))
    assert aux[".absmax"].tolist() == [2.0]
    state = bnb4.requantized_state(aux, _state(values.shape, False))
    back = bnb4.dequantize(packed, state)
    np.testing.assert_allclose(back, values, atol=2 * 0.1)
    # 100 values in blocks of 64: the last block has 36 values and its own absmax
    values = np.linspace(-3, 5, 100, dtype=np.float32).reshape(10, 10)
    packed, aux = bnb4.quantize(values, _state(values.shape, False))
    assert aux[".absmax"].tolist() == pytest.approx([np.abs(values.ravel()[:64]).max(), 5.0])


def test_nested_round_trip_through_tensors():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((64, 64)).astype(np.float32)
    state = _state(values.shape, True)
    packed, aux = bnb4.quantize(values, state)
    blob = json.loads(bytes(aux["quant_state"]))
    assert blob["nested_blocksize"] == 256 and aux[".absmax"].dtype == np.uint8
    name = "w.weight"
    tensors = {name: packed, f"{name}.quant_state.bitsandbytes__nf4": aux["quant_state"]}
    tensors |= {name + k: v for k, v in aux.items() if k != "quant_state"}
    read = bnb4.read_state(tensors, name)
    assert read.nested and read.shape == (64, 64)
    np.testing.assert_allclose(read.absmax, np.abs(values.reshape(-1, 64)).max(1), rtol=2e-2)
    back = bnb4.dequantize(packed, read)
    assert np.abs(back - values).max() < 0.25 * np.abs(values).max()
    del tensors[name + ".nested_absmax"]
    with pytest.raises(LoraformatError, match=r"lacks w\.weight\.nested_absmax"):
        bnb4.read_state(tensors, name)
