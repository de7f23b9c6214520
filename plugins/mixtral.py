"""Mixtral (Hugging Face layout): Mistral's attention with a routed MLP. Checkpoints keep the
original names — router ``block_sparse_moe.gate``, experts ``block_sparse_moe.experts.N.w1`` (gate),
``w3`` (up), ``w2`` (down) — one tensor per expert; transformers 5 holds them in memory (and PEFT
names them) as ``mlp.gate`` and the stacked ``mlp.experts.gate_up_proj`` [E, 2I, H] (w1 rows, then
w3 rows) and ``mlp.experts.down_proj`` [E, H, I]. llama.cpp converts it as ``llama``, permuting
the q/k rows as for LLaMA."""

from __future__ import annotations

from collections.abc import Sequence

from loraformat.architecture import ExpertStorage, hookimpl
from loraformat.architecture.decoder import (
    SPLIT_ATTENTION,
    DecoderSpec,
    base_spec,
    has_tensor,
    layer_windows,
    llama_cpp_qk_permutation,
)
from loraformat.architecture.protocol import CheckpointInfo

from ._moe import MoeFamily, moe_names, moe_spec

LORAFORMAT_PLUGIN_API = 2

ROUTER = "block_sparse_moe.gate"
EXPERTS = (
    ExpertStorage(
        "mlp.experts.gate_up_proj",
        ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3"),
        gguf=("ffn_gate_exps", "ffn_up_exps"),
    ),
    ExpertStorage(
        "mlp.experts.down_proj", ("block_sparse_moe.experts.{e}.w2",), gguf=("ffn_down_exps",)
    ),
)


class Mixtral(MoeFamily):
    id = "mixtral"
    description = "Mixtral decoder (Mistral attention, routed SwiGLU experts)"
    model_types = ("mixtral",)
    classes = ("MixtralForCausalLM", "MixtralModel")
    router = ROUTER
    expert_storage = EXPERTS
    names = moe_names(SPLIT_ATTENTION, ROUTER, "mlp.gate", EXPERTS)
    targets = ("q_proj", "v_proj")
    gguf_architecture = "llama"

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return has_tensor(checkpoint, "block_sparse_moe.experts.0.w1.weight")

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        return llama_cpp_qk_permutation(checkpoint, layer_path) if convention == "gguf" else None

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the Mixtral decoder"))
        # as Mistral: transformers' Mixtral slides on every layer when the config has a window
        window = checkpoint.config.get("sliding_window")
        decoder = base_spec(checkpoint, "Mixtral",
                            windows=layer_windows({}, n_layer, window, lambda i: True))
        # softmax over every expert, top-k, renormalized (MixtralTopKRouter)
        return moe_spec(decoder, self.moe_block(checkpoint, (True,) * n_layer, True))


@hookimpl
def loraformat_architectures() -> list[Mixtral]:
    return [Mixtral()]
