"""Qwen2-MoE (Hugging Face layout): Qwen2's attention (q/k/v biases) with a routed MLP plus a
shared expert — router ``mlp.gate``, E experts stored one tensor per expert and projection
(``mlp.experts.N.{gate,up,down}_proj.weight``, stacked in memory as Qwen3-MoE's), a shared SwiGLU
expert ``mlp.shared_expert.{gate,up,down}_proj`` whose output is scaled by
sigmoid(``mlp.shared_expert_gate``); layers in ``mlp_only_layers`` keep a dense MLP. llama.cpp
converts it as ``qwen2moe`` (shared expert ``ffn_*_shexp``, its gate ``ffn_gate_inp_shexp``)."""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    SPLIT_ATTENTION,
    SPLIT_MLP,
    DecoderSpec,
    base_spec,
    has_tensor,
)
from loraformat.architecture.protocol import CheckpointInfo

from ._moe import SHARED_EXPERT_GGUF, MoeFamily, moe_names, moe_spec, qwen_routed
from .qwen2 import qwen_windows
from .qwen3_moe import EXPERTS

LORAFORMAT_PLUGIN_API = 2

DENSE = SPLIT_ATTENTION + SPLIT_MLP + tuple(SHARED_EXPERT_GGUF)


class Qwen2Moe(MoeFamily):
    id = "qwen2_moe"
    description = "Qwen2-MoE decoder (Qwen2 attention, routed SwiGLU experts, shared expert)"
    model_types = ("qwen2_moe",)
    classes = ("Qwen2MoeForCausalLM", "Qwen2MoeModel")
    projections = DENSE
    router = "mlp.gate"
    expert_storage = EXPERTS
    names = moe_names(DENSE, "mlp.gate", "mlp.gate", EXPERTS)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "qwen2moe"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return has_tensor(checkpoint, "mlp.shared_expert_gate.weight") and has_tensor(
            checkpoint, "mlp.experts.0.gate_proj.weight"
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the Qwen2-MoE decoder"))
        decoder = base_spec(checkpoint, "Qwen2-MoE", windows=qwen_windows(checkpoint, n_layer))
        normalize = bool(checkpoint.config.get("norm_topk_prob", False))
        return moe_spec(decoder, self.moe_block(
            checkpoint, qwen_routed(checkpoint, n_layer), normalize,
            shared_expert="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"))


@hookimpl
def loraformat_architectures() -> list[Qwen2Moe]:
    return [Qwen2Moe()]
