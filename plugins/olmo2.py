"""OLMo 2 (Hugging Face ``Olmo2ForCausalLM``): LLaMA's projections with RMSNorm only after each
sublayer (``post_attention_layernorm``, ``post_feedforward_layernorm``, no input norm) and q/k
RMSNorm over the whole q and k projections, before the head split.

llama.cpp converts it as ``olmo2`` through TextModel, which does not permute q/k rows.
"""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    POST_NORMS,
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    has_tensor,
)
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2


def olmo_common() -> dict[str, object]:
    """What OLMo 2 and 3 share: post-norms and q/k norms over the whole projection."""
    return {"qk_norm": True, "qk_norm_span": "projection", "block_norms": POST_NORMS}


class Olmo2(DecoderFamily):
    id = "olmo2"
    description = "OLMo 2 decoder (post-sublayer RMSNorms, q/k RMSNorm over the projection)"
    model_types = ("olmo2",)
    classes = ("Olmo2ForCausalLM", "Olmo2Model")
    names = decoder_names(DecoderFamily.projections)
    # PEFT has no default target_modules for OLMo 2; LLaMA's (the same projections).
    targets = ("q_proj", "v_proj")
    gguf_architecture = "olmo2"
    ort_model_type = "bert"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        # OLMo 3's tensors are OLMo 2's: bare tensors read as OLMo 2 (no sliding windows).
        return (
            has_tensor(checkpoint, "post_feedforward_layernorm.weight")
            and has_tensor(checkpoint, "self_attn.q_norm.weight")
            and not has_tensor(checkpoint, "input_layernorm.weight")
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        return base_spec(checkpoint, "OLMo 2", **olmo_common())


@hookimpl
def loraformat_architectures() -> list[Olmo2]:
    return [Olmo2()]
