"""Phi-3 (Hugging Face layout): fused ``qkv_proj`` and ``gate_up_proj`` (described as fused
parts, so an adapter may target one part and conversions can split them), LongRoPE (su) scaling,
optional sliding window on every layer, partial rotary."""

from __future__ import annotations

from loraformat.architecture import FusedPart, hookimpl
from loraformat.architecture.decoder import (
    FUSED_ATTENTION,
    FUSED_MLP,
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    has_tensor,
    heads,
    layer_windows,
)
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2


class Phi3(DecoderFamily):
    id = "phi3"
    description = "Phi-3 decoder (fused qkv_proj and gate_up_proj, LongRoPE, SwiGLU)"
    model_types = ("phi3",)
    classes = ("Phi3ForCausalLM", "Phi3Model")
    projections = FUSED_ATTENTION + FUSED_MLP
    names = decoder_names(FUSED_ATTENTION + FUSED_MLP)
    # PEFT has no default target_modules for phi3; its default for codegen's fused attention
    # projection (also named qkv_proj) is that projection, the analogue of q_proj/v_proj.
    targets = ("qkv_proj",)
    gguf_architecture = "phi3"
    ort_model_type = "bert"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return has_tensor(checkpoint, "self_attn.qkv_proj.weight") and has_tensor(
            checkpoint, "mlp.gate_up_proj.weight"
        )

    def parts(self, checkpoint: CheckpointInfo) -> dict[str, tuple[FusedPart, ...]]:
        n_head, n_kv, head_dim = heads(checkpoint, "Phi-3's fused qkv_proj parts")
        q, kv = n_head * head_dim, n_kv * head_dim
        inner = int(checkpoint.config_value("intermediate_size", what="Phi-3's gate_up_proj parts"))
        return {
            "self_attn.qkv_proj": (
                FusedPart("q", 0, q),
                FusedPart("k", q, q + kv),
                FusedPart("v", q + kv, q + 2 * kv),
            ),
            "mlp.gate_up_proj": (FusedPart("gate", 0, inner), FusedPart("up", inner, 2 * inner)),
        }

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the Phi-3 export module"))
        window = checkpoint.config.get("sliding_window")
        windows = layer_windows({}, n_layer, window, lambda i: True)
        return base_spec(checkpoint, "Phi-3", fused_qkv=True, fused_gate_up=True, windows=windows)


@hookimpl
def loraformat_architectures() -> list[Phi3]:
    return [Phi3()]
