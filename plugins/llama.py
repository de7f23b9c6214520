"""LLaMA (Hugging Face layout): GQA, RoPE (default, linear and llama3 scaling), SwiGLU, RMSNorm.

The plain configuration of the shared decoder (no window, one rope, split projections).
Checkpoints saved by ``LlamaForCausalLM`` put the decoder under ``model.`` and the head at
``lm_head`` (absent when tied to ``model.embed_tokens``); a bare ``LlamaModel`` has no prefix.
"""

from __future__ import annotations

import re
from typing import Any

from loraformat.architecture import CheckpointInfo, hookimpl
from loraformat.architecture.decoder import (
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    rope_from_config,
)

LORAFORMAT_PLUGIN_API = 2

_GATE = re.compile(r"^(?:.*\.)?layers\.\d+\.mlp\.gate_proj\.weight$")


class Llama(DecoderFamily):
    id = "llama"
    description = "LLaMA decoder (GQA, RoPE incl. llama3 scaling, SwiGLU)"
    model_types = ("llama",)
    classes = ("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification",
               "LlamaForTokenClassification", "LlamaForQuestionAnswering")
    names = decoder_names(DecoderFamily.projections)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "llama"
    llama_cpp_permutes = True
    ort_model_type = "bert"  # ONNX Runtime's optimizer has no llama type; its bert passes apply

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        names = checkpoint.shapes
        # LLaMA-named relatives (Qwen2: q/k/v biases; Qwen3/OLMo2: q/k norms) are not LLaMA.
        relatives = any(
            n.endswith(("q_proj.bias", "q_norm.weight", "k_norm.weight")) for n in names
        )
        return not relatives and any(_GATE.match(n) for n in names)

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        return base_spec(checkpoint, "LLaMA")


@hookimpl
def loraformat_architectures() -> list[Llama]:
    return [Llama()]


def rope_inv_freq(checkpoint: CheckpointInfo, head_dim: int) -> tuple[Any, float]:
    """(inverse frequencies, attention scaling) as transformers computes them for the config's
    ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (older)."""
    config = checkpoint.config
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope = rope_from_config(params, config, head_dim, checkpoint)
    return rope.inv_freq, rope.scaling
