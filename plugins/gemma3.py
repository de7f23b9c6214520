"""Gemma 3, text model (Hugging Face ``Gemma3ForCausalLM``): Gemma 2's block with per-head q/k
``(1 + w)`` RMSNorm, and local (sliding) and global layers that each have their own rope."""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    FULL,
    SLIDING,
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    has_tensor,
    heads,
    layer_kinds,
    rope_from_config,
)
from loraformat.architecture.protocol import CheckpointInfo

from .gemma2 import gemma_common

LORAFORMAT_PLUGIN_API = 2


class Gemma3(DecoderFamily):
    id = "gemma3"
    description = "Gemma 3 text decoder (q/k norms, local/global layers with their own rope bases)"
    model_types = ("gemma3_text",)
    classes = ("Gemma3ForCausalLM", "Gemma3TextModel")
    names = decoder_names(DecoderFamily.projections)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "gemma3"
    ort_model_type = "bert"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return has_tensor(checkpoint, "pre_feedforward_layernorm.weight") and has_tensor(
            checkpoint, "self_attn.q_norm.weight"
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        c = checkpoint.config
        n_layer = int(
            checkpoint.config_value("num_hidden_layers", what="the Gemma 3 export module")
        )
        _, _, head_dim = heads(checkpoint, "the Gemma 3 export module")
        pattern = int(c.get("sliding_window_pattern") or 6)
        kinds = layer_kinds(c, n_layer, lambda i: (i + 1) % pattern != 0)
        params = c.get("rope_parameters") or {}
        if FULL not in params:
            # Older configs: rope_theta (+ rope_scaling) for global layers, rope_local_base_freq
            # for local ones.
            params = {
                FULL: {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 1e6)},
                SLIDING: {"rope_theta": c.get("rope_local_base_freq", 10000.0)},
            }
        ropes = {k: rope_from_config(params[k], c, head_dim, checkpoint) for k in set(kinds)}
        window = c.get("sliding_window")
        windows = tuple(window if k == SLIDING else None for k in kinds)
        return base_spec(
            checkpoint,
            "Gemma 3",
            ropes=ropes,
            rope_of=kinds,
            windows=windows,
            qk_norm=True,
            **gemma_common(checkpoint),
        )


@hookimpl
def loraformat_architectures() -> list[Gemma3]:
    return [Gemma3()]
