"""Granite (Hugging Face ``GraniteForCausalLM``, Granite 3.x dense): LLaMA's block with four
scalars from the config: embeddings times ``embedding_multiplier``, each sublayer's output times
``residual_multiplier`` before the residual add, attention scores scaled by
``attention_multiplier`` (instead of 1/√head_dim), logits divided by ``logits_scaling``.

llama.cpp converts it as ``granite`` through LlamaModel, which permutes the q/k rows.
"""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
)
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2


def optional_float(checkpoint: CheckpointInfo, key: str) -> float | None:
    value = checkpoint.config.get(key)
    return None if value is None else float(value)


class Granite(DecoderFamily):
    id = "granite"
    description = "Granite decoder (LLaMA's block, embedding/residual/attention/logit multipliers)"
    model_types = ("granite",)
    classes = ("GraniteForCausalLM", "GraniteModel")
    names = decoder_names(DecoderFamily.projections)
    # PEFT has no default target_modules for Granite; LLaMA's (the same projections).
    targets = ("q_proj", "v_proj")
    gguf_architecture = "granite"
    ort_model_type = "bert"
    llama_cpp_permutes = True

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        return base_spec(
            checkpoint,
            "Granite",
            embed_scale=optional_float(checkpoint, "embedding_multiplier"),
            attn_scale=optional_float(checkpoint, "attention_multiplier"),
            residual_scale=optional_float(checkpoint, "residual_multiplier"),
            logits_divisor=optional_float(checkpoint, "logits_scaling"),
        )


@hookimpl
def loraformat_architectures() -> list[Granite]:
    return [Granite()]
