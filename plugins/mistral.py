"""Mistral (Hugging Face layout): LLaMA's block with a sliding attention window on every layer.

Its tensors are LLaMA's, so only the config tells them apart; llama.cpp converts it as ``llama``
(through LlamaModel, which permutes the q/k rows).
"""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    layer_windows,
)
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2


class Mistral(DecoderFamily):
    id = "mistral"
    description = "Mistral decoder (GQA, RoPE, SwiGLU, sliding-window attention)"
    model_types = ("mistral",)
    classes = ("MistralForCausalLM", "MistralModel")
    names = decoder_names(DecoderFamily.projections)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "llama"
    ort_model_type = "bert"
    llama_cpp_permutes = True

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(
            checkpoint.config_value("num_hidden_layers", what="the Mistral export module")
        )
        # transformers' Mistral slides on every layer (it ignores layer_types).
        window = checkpoint.config.get("sliding_window")
        return base_spec(
            checkpoint, "Mistral", windows=layer_windows({}, n_layer, window, lambda i: True)
        )


@hookimpl
def loraformat_architectures() -> list[Mistral]:
    return [Mistral()]
