"""Quantized weight formats: exact dequantization, requantization, and how much of an adapter a
requantized merge keeps.

- :mod:`.ggml`: GGUF (llama.cpp) tensor types, with gguf-py as the reference codec;
- :mod:`.bnb4`: bitsandbytes 4-bit (NF4/FP4, blockwise absmax, nested absmax) as
  transformers saves it;
- :mod:`.matmulnbits`: ONNX Runtime's MatMulNBits blockwise int4/int8 layout;
- :mod:`.survival`: the per-layer survival report any quantized merge produces.

Numpy only (no torch): every function takes and returns arrays.
"""

from .survival import DEFAULT_THRESHOLD, LayerSurvival, SurvivalReport, measure

__all__ = ["DEFAULT_THRESHOLD", "LayerSurvival", "SurvivalReport", "measure"]
