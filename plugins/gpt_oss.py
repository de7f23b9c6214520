"""gpt-oss (Hugging Face layout): attention with q/k/v/o biases and per-head sinks, alternating
sliding/full layers, and a routed MLP whose experts are stored stacked exactly as transformers
holds them: ``mlp.experts.gate_up_proj`` [E, H, 2I] (each expert [in, out], gate and up
interleaved column by column) with ``gate_up_proj_bias`` [E, 2I], ``mlp.experts.down_proj``
[E, I, H] with ``down_proj_bias``; router ``mlp.router`` (with bias). PEFT adapts the stacked
parameters under the same names. llama.cpp converts it as ``gpt-oss`` (``ffn_gate_exps`` /
``ffn_up_exps`` de-interleaved from gate_up, ``ffn_down_exps``)."""

from __future__ import annotations

from loraformat.architecture import ExpertStorage, hookimpl
from loraformat.architecture.decoder import (
    SPLIT_ATTENTION,
    DecoderSpec,
    base_spec,
    has_tensor,
    layer_windows,
)
from loraformat.architecture.protocol import CheckpointInfo

from ._moe import MoeFamily, moe_names, moe_spec

LORAFORMAT_PLUGIN_API = 2

EXPERTS = (
    ExpertStorage(
        "mlp.experts.gate_up_proj", layout="in_out", gguf=("ffn_gate_exps", "ffn_up_exps"),
        interleaved=True,
    ),
    ExpertStorage("mlp.experts.down_proj", layout="in_out", gguf=("ffn_down_exps",)),
)


class GptOss(MoeFamily):
    id = "gpt_oss"
    description = "gpt-oss decoder (attention sinks, biased stacked experts, clamped SwiGLU)"
    model_types = ("gpt_oss",)
    classes = ("GptOssForCausalLM", "GptOssModel")
    router = "mlp.router"
    expert_storage = EXPERTS
    names = moe_names(SPLIT_ATTENTION, "mlp.router", "mlp.router", EXPERTS)
    # GptOssTopKRouter is no nn.Linear: PEFT adapts it as target_parameters "mlp.router.weight".
    peft_weight_parameters = ("mlp.router",)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "gpt-oss"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return has_tensor(checkpoint, "self_attn.sinks") and has_tensor(
            checkpoint, "mlp.router.weight"
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        config = checkpoint.config
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the gpt-oss decoder"))
        window = config.get("sliding_window")
        decoder = base_spec(checkpoint, "gpt-oss", windows=layer_windows(
            config, n_layer, window, lambda i: i % 2 == 0))
        # softmax over the top-k logits = softmax over all, top-k, renormalized; SwiGLU as
        # GptOssExperts computes it (gate·σ(1.702·gate), up + 1, both clamped at swiglu_limit)
        limit = config.get("swiglu_limit", 7.0)
        block = self.moe_block(checkpoint, (True,) * n_layer, True, alpha=1.702, beta=1.0,
                               limit=None if limit is None else float(limit))
        return moe_spec(decoder, block, attn_sinks=True)


@hookimpl
def loraformat_architectures() -> list[GptOss]:
    return [GptOss()]
