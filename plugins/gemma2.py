"""Gemma 2 (Hugging Face layout): GeGLU, ``(1 + w)`` RMSNorm before and after attention and MLP,
embeddings scaled by √hidden, attention scaled by ``query_pre_attn_scalar`` and soft-capped,
final logits soft-capped, sliding-window and global layers alternating. Embeddings are tied."""

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


def gemma_common(checkpoint: CheckpointInfo) -> dict[str, object]:
    """What Gemma 2 and 3 share: norms, embedding scale, attention scale, soft-caps."""
    c = checkpoint.config
    hidden = int(checkpoint.config_value("hidden_size", what="the Gemma export module"))
    scalar = checkpoint.config_value("query_pre_attn_scalar", default=None)
    return {
        "activation": c.get("hidden_activation") or "gelu_pytorch_tanh",
        "gemma_norm": True,
        "sandwich_norm": True,
        "embed_scale": hidden**0.5,
        "attn_scale": float(scalar) ** -0.5 if scalar is not None else None,
        "attn_softcap": c.get("attn_logit_softcapping"),
        "final_softcap": c.get("final_logit_softcapping"),
    }


class Gemma2(DecoderFamily):
    id = "gemma2"
    description = "Gemma 2 decoder (GeGLU, sandwich (1+w) RMSNorms, soft-caps, local/global layers)"
    model_types = ("gemma2",)
    classes = ("Gemma2ForCausalLM", "Gemma2Model")
    names = decoder_names(DecoderFamily.projections, lm_head_in_gguf=False)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "gemma2"
    ort_model_type = "bert"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return has_tensor(checkpoint, "pre_feedforward_layernorm.weight") and not has_tensor(
            checkpoint, "self_attn.q_norm.weight"
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(
            checkpoint.config_value("num_hidden_layers", what="the Gemma 2 export module")
        )
        window = checkpoint.config.get("sliding_window")
        # Without layer_types, transformers' Gemma 2 slides on the even layers.
        windows = layer_windows(checkpoint.config, n_layer, window, lambda i: i % 2 == 0)
        return base_spec(checkpoint, "Gemma 2", windows=windows, **gemma_common(checkpoint))


@hookimpl
def loraformat_architectures() -> list[Gemma2]:
    return [Gemma2()]
