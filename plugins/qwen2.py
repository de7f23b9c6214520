"""Qwen2 / Qwen2.5 (Hugging Face layout): LLaMA's block with q/k/v biases (o_proj has none), tied
or untied embeddings, optional sliding window on the layers from ``max_window_layers`` on."""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    has_tensor,
    layer_windows,
)
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2


def qwen_windows(checkpoint: CheckpointInfo, n_layer: int) -> tuple[int | None, ...]:
    """Qwen's sliding window: only with ``use_sliding_window``, on the layers ``layer_types``
    marks (else those from ``max_window_layers`` on), as transformers' Qwen2/Qwen3 configs do."""
    config = checkpoint.config
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    start = int(config.get("max_window_layers") or 0)
    return layer_windows(config, n_layer, window, lambda i: i >= start)


class Qwen2(DecoderFamily):
    id = "qwen2"
    description = "Qwen2/2.5 decoder (GQA, q/k/v biases, RoPE, SwiGLU, optional sliding window)"
    model_types = ("qwen2",)
    classes = ("Qwen2ForCausalLM", "Qwen2Model")
    names = decoder_names(DecoderFamily.projections)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "qwen2"
    ort_model_type = "bert"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return (
            has_tensor(checkpoint, "self_attn.q_proj.bias")
            and has_tensor(checkpoint, "mlp.gate_proj.weight")
            and not has_tensor(checkpoint, "self_attn.q_norm.weight")
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the Qwen2 export module"))
        return base_spec(checkpoint, "Qwen2", windows=qwen_windows(checkpoint, n_layer))


@hookimpl
def loraformat_architectures() -> list[Qwen2]:
    return [Qwen2()]
