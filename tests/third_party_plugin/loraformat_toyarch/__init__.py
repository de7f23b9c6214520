"""loraformat-toyarch: a third-party loraformat plugin for the toy architecture ``toymlp``.

``toymlp`` is a token-embedding table, ``num_layers`` residual gated-MLP blocks and a per-token
classification head. Its shapes are chosen to exercise every field a plugin reports: an embedding
layer, a fused layer stored ``[in, out]`` (``blocks.N.up`` holds the ``gate`` and ``up`` parts),
plain ``[out, in]`` layers, and a foreign convention that permutes rows.
"""

from .checkpoint import reference_logits, write_checkpoint

__version__ = "0.3.0"
__all__ = ["reference_logits", "write_checkpoint"]
