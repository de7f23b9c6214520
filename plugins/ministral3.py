"""Ministral 3 (Hugging Face ``Ministral3ForCausalLM``, and the language model of
``Mistral3ForConditionalGeneration``): Mistral's block with YaRN rope and a position-dependent
query temperature (``1 + β·log(1 + ⌊pos / original context⌋)``, the rope's
``llama_4_scaling_beta``), optionally a sliding window on every layer.

The multimodal checkpoint is the ``mistral3`` plugin's. llama.cpp converts both as ``mistral3``
through LlamaModel, which permutes the q/k rows.
"""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    layer_windows,
    llama4_query_scale,
)
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2


class Ministral3(DecoderFamily):
    id = "ministral3"
    description = "Ministral 3 decoder (Mistral's block, YaRN rope, query temperature)"
    model_types = ("ministral3",)
    classes = ("Ministral3ForCausalLM", "Ministral3Model")
    names = decoder_names(DecoderFamily.projections)
    # PEFT has no default target_modules for Ministral 3; Mistral's.
    targets = ("q_proj", "v_proj")
    gguf_architecture = "mistral3"
    ort_model_type = "bert"
    llama_cpp_permutes = True

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        c = checkpoint.config
        n_layer = int(
            checkpoint.config_value("num_hidden_layers", what="the Ministral 3 export module")
        )
        params = c.get("rope_parameters") or {}
        beta = params.get("llama_4_scaling_beta")
        original = params.get("original_max_position_embeddings")
        scale = llama4_query_scale(beta, original) if beta and original else None
        # transformers' Ministral 3 slides on every layer when sliding_window is set.
        windows = layer_windows({}, n_layer, c.get("sliding_window"), lambda i: True)
        return base_spec(checkpoint, "Ministral 3", windows=windows, query_scale=scale)


@hookimpl
def loraformat_architectures() -> list[Ministral3]:
    return [Ministral3()]
