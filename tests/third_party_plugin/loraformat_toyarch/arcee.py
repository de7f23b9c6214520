"""A decoder family added from outside loraformat on its public decoder description: Arcee
(``ArceeForCausalLM``, AFM-4.5B), which is LLaMA with a new piece — an MLP without a gate,
``down(relu(up(x))²)``.

The family is configuration (:func:`~loraformat.architecture.decoder.base_spec`: sizes, rope
incl. YaRN, from the config) plus one replaced block (:mod:`.arcee_blocks`, imported only when a
module is built, so importing this plugin never imports torch). Everything else — detection,
dense layers, PEFT/llama.cpp/MLX names, llama.cpp's q/k row order, the traced KV-cache decoder,
``generate``, LoRA slots — comes from :class:`~loraformat.architecture.decoder.DecoderFamily`.
"""

from __future__ import annotations

from typing import Any

from loraformat.architecture import CheckpointInfo, hookimpl
from loraformat.architecture.decoder import (
    SPLIT_ATTENTION,
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
)

LORAFORMAT_PLUGIN_API = 2
#: Arcee's block projections: LLaMA's attention, an MLP of two (no gate_proj).
PROJECTIONS = (*SPLIT_ATTENTION, "mlp.up_proj", "mlp.down_proj")


class Arcee(DecoderFamily):
    id = "arcee"
    description = "Arcee decoder (LLaMA attention, ReLU² MLP without a gate; loraformat-toyarch)"
    model_types = ("arcee",)
    classes = ("ArceeForCausalLM", "ArceeModel")
    projections = PROJECTIONS
    names = decoder_names(PROJECTIONS)  # llama.cpp: blk.N.ffn_up / ffn_down, as for LLaMA
    targets = ("q_proj", "v_proj")
    gguf_architecture = "arcee"  # llama.cpp's ArceeModel, a LlamaModel: q/k rows permuted
    llama_cpp_permutes = True

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        return base_spec(checkpoint, "Arcee")

    def blocks(self, spec: DecoderSpec) -> Any:
        from .arcee_blocks import ARCEE_BLOCKS

        return ARCEE_BLOCKS


@hookimpl
def loraformat_architectures() -> list[Arcee]:
    return [Arcee()]
