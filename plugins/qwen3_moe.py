"""Qwen3-MoE (Hugging Face layout): Qwen3's attention (per-head q/k RMSNorm) with a routed MLP —
router ``mlp.gate`` and E SwiGLU experts stored one tensor per expert and projection
(``mlp.experts.N.{gate,up,down}_proj.weight``), as transformers 5 saves them and as the published
checkpoints hold them; layers listed in ``mlp_only_layers`` keep a dense MLP. In memory (and so in
PEFT adapters) the experts are stacked: ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows, then
up rows) and ``mlp.experts.down_proj`` [E, H, I]. llama.cpp converts it as ``qwen3moe``."""

from __future__ import annotations

from loraformat.architecture import ExpertStorage, hookimpl
from loraformat.architecture.decoder import (
    SPLIT_ATTENTION,
    SPLIT_MLP,
    DecoderSpec,
    base_spec,
    has_tensor,
)
from loraformat.architecture.protocol import CheckpointInfo

from ._moe import MoeFamily, moe_names, moe_spec, qwen_routed
from .qwen2 import qwen_windows

LORAFORMAT_PLUGIN_API = 2

EXPERTS = (
    ExpertStorage(
        "mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
        gguf=("ffn_gate_exps", "ffn_up_exps"),
    ),
    ExpertStorage(
        "mlp.experts.down_proj", ("mlp.experts.{e}.down_proj",), gguf=("ffn_down_exps",)
    ),
)


class Qwen3Moe(MoeFamily):
    id = "qwen3_moe"
    description = "Qwen3-MoE decoder (Qwen3 attention, routed SwiGLU experts)"
    model_types = ("qwen3_moe",)
    classes = ("Qwen3MoeForCausalLM", "Qwen3MoeModel")
    projections = SPLIT_ATTENTION + SPLIT_MLP  # SPLIT_MLP: the mlp_only_layers
    router = "mlp.gate"
    expert_storage = EXPERTS
    names = moe_names(SPLIT_ATTENTION + SPLIT_MLP, "mlp.gate", "mlp.gate", EXPERTS)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "qwen3moe"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return has_tensor(checkpoint, "self_attn.q_norm.weight") and has_tensor(
            checkpoint, "mlp.experts.0.gate_proj.weight"
        )

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the Qwen3-MoE decoder"))
        decoder = base_spec(checkpoint, "Qwen3-MoE", qk_norm=True,
                            windows=qwen_windows(checkpoint, n_layer))
        normalize = bool(checkpoint.config.get("norm_topk_prob", False))
        return moe_spec(decoder, self.moe_block(
            checkpoint, qwen_routed(checkpoint, n_layer), normalize))


@hookimpl
def loraformat_architectures() -> list[Qwen3Moe]:
    return [Qwen3Moe()]
