"""The public description of a decoder family, for built-in and third-party plugins alike.

A family is data: a :class:`DecoderSpec` (sizes, ropes, per-layer kinds, windows, shapes and
caches, and the switches LLaMA's relatives differ by) and a :class:`DecoderFamily` subclass that
says how to read it from a config and names its tensors. From that description

- the torch export module is built (:mod:`.blocks`: module-level building blocks — mixers by
  layer kind, MLP, layer, body — which a family replaces one at a time through
  :meth:`DecoderFamily.blocks`);
- ONNX Runtime decoders are emitted op by op where the emitter writes every field
  (``loraformat.export.emitter``), traced from the module otherwise;
- ``generate``, the GenAI config writer and the exporter read each layer's cache
  (:meth:`DecoderSpec.layer_caches`).

``spec/PLUGINS.md`` ("Decoder families") is the author's guide. This package does not import
torch; :mod:`.blocks` does, and is imported only when a module is built.
"""

from .causal_lm import causal_lm, decoder_export_model, kv_caches, layer_pasts, past_arg_name
from .config import (
    PREFIX,
    has_tensor,
    head_path,
    heads,
    language_model,
    model_type,
    shape_of,
)
from .family import (
    FUSED_ATTENTION,
    FUSED_MLP,
    GGUF_PROJECTIONS,
    SPLIT_ATTENTION,
    SPLIT_MLP,
    DecoderFamily,
    decoder_names,
    dense_layers,
    gguf_permutation,
    llama_cpp_qk_permutation,
)
from .rope import Rope, context_scaling, no_rope, rope_from_config, yarn_rope
from .spec import (
    BATCH,
    EXTENSIONS,
    FULL,
    LINEAR,
    PAST,
    POST_NORMS,
    PRE_NORMS,
    SANDWICH_NORMS,
    SLIDING,
    CacheTensor,
    DecoderSpec,
    LayerCache,
    base_spec,
    kv_cache,
    layer_kinds,
    layer_windows,
    llama4_query_scale,
)

__all__ = [
    "BATCH",
    "EXTENSIONS",
    "FULL",
    "FUSED_ATTENTION",
    "FUSED_MLP",
    "GGUF_PROJECTIONS",
    "LINEAR",
    "PAST",
    "POST_NORMS",
    "PREFIX",
    "PRE_NORMS",
    "SANDWICH_NORMS",
    "SLIDING",
    "SPLIT_ATTENTION",
    "SPLIT_MLP",
    "CacheTensor",
    "DecoderFamily",
    "DecoderSpec",
    "LayerCache",
    "Rope",
    "base_spec",
    "causal_lm",
    "context_scaling",
    "decoder_export_model",
    "decoder_names",
    "dense_layers",
    "gguf_permutation",
    "has_tensor",
    "head_path",
    "heads",
    "kv_cache",
    "kv_caches",
    "language_model",
    "layer_kinds",
    "layer_pasts",
    "layer_windows",
    "llama4_query_scale",
    "llama_cpp_qk_permutation",
    "model_type",
    "no_rope",
    "past_arg_name",
    "rope_from_config",
    "shape_of",
    "yarn_rope",
]
