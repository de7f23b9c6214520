"""Qwen3 (Hugging Face layout): LLaMA's block with per-head q/k RMSNorm before the rotary
embedding, an explicit ``head_dim`` and optional attention biases."""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    has_tensor,
)
from loraformat.architecture.protocol import CheckpointInfo

from .qwen2 import qwen_windows

LORAFORMAT_PLUGIN_API = 2


class Qwen3(DecoderFamily):
    id = "qwen3"
    description = "Qwen3 decoder (GQA, per-head q/k RMSNorm, explicit head_dim, RoPE, SwiGLU)"
    model_types = ("qwen3",)
    classes = ("Qwen3ForCausalLM", "Qwen3Model")
    names = decoder_names(DecoderFamily.projections)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "qwen3"
    ort_model_type = "qwen3"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return (
            has_tensor(checkpoint, "self_attn.q_norm.weight")
            and has_tensor(checkpoint, "mlp.gate_proj.weight")
            and not has_tensor(checkpoint, "pre_feedforward_layernorm.weight")
            # OLMo 2's blocks have q/k norms too, but no input norm.
            and has_tensor(checkpoint, "input_layernorm.weight")
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the Qwen3 export module"))
        return base_spec(
            checkpoint, "Qwen3", qk_norm=True, windows=qwen_windows(checkpoint, n_layer)
        )


@hookimpl
def loraformat_architectures() -> list[Qwen3]:
    return [Qwen3()]
