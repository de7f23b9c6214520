"""The GGUF block codecs against gguf-py, and the refusals for types that cannot be written."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from loraformat.errors import LoraformatError
from loraformat.quant import ggml


def test_ggml_codec_matches_gguf_py():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    for kind in ggml.QUANTIZABLE:
        raw = ggml.quantize(values, kind)
        assert raw.nbytes == ggml.nbytes(kind, values.shape)
        ref = gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])
        assert bytes(raw) == np.ascontiguousarray(ref).tobytes()
        back = ggml.dequantize(raw, kind, values.shape)
        assert back.dtype == np.float32 and back.shape == values.shape
    # k-quants dequantize (gguf-py's codec) but are not writable
    with pytest.raises(LoraformatError, match="Q6_K"):
        ggml.check_writable("Q6_K", (4, 256), "x.gguf", "t")
    with pytest.raises(LoraformatError, match="not a whole number of Q4_0 blocks"):
        ggml.check_writable("Q4_0", (4, 48), "x.gguf", "t")
    with pytest.raises(LoraformatError, match="unknown GGUF type 'Q9'"):
        ggml.qtype("Q9")
