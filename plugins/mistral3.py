"""Mistral 3 multimodal (Hugging Face ``Mistral3ForConditionalGeneration``): a Pixtral vision
tower and projector beside a Ministral 3 (or Mistral) language model. Only the language model is
described: its decoder is stored under ``language_model.model.`` (the head at
``language_model.lm_head``) with its sizes in ``text_config``; the vision tower and the
projector are left out of merge and export (:meth:`Mistral3.left_out` names them).

transformers 5 holds the decoder as ``model.language_model.`` in memory, which is the path PEFT
names; llama.cpp's ``mistral3`` converter drops the ``language_model`` level (``blk.N``);
MLX-LM's mistral3 model keeps the stored path.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import GGUF_PROJECTIONS, DecoderFamily
from loraformat.architecture.names import SAME, NameTable
from loraformat.architecture.protocol import CheckpointInfo

from .ministral3 import Ministral3

LORAFORMAT_PLUGIN_API = 2
#: Language models llama.cpp's mistral3 converter takes from this checkpoint class.
TEXT_MODEL_TYPES = ("ministral3", "mistral")
STORED, IN_MEMORY = "language_model.model.", "model.language_model."


def multimodal_names(projections: Sequence[str]) -> NameTable:
    rows: list[tuple[str, str | None, str | None, str | None]] = [
        (STORED + "layers.{bid}." + p, IN_MEMORY + "layers.{bid}." + p,
         "blk.{bid}." + GGUF_PROJECTIONS[p], SAME)
        for p in projections
    ]
    rows.append((STORED + "embed_tokens", IN_MEMORY + "embed_tokens", "token_embd", SAME))
    rows.append(("language_model.lm_head", "lm_head", "output", SAME))
    return NameTable(("checkpoint", "peft", "gguf", "mlx"), rows)


class Mistral3(Ministral3):
    id = "mistral3"
    description = "Mistral 3 multimodal: its Ministral 3 / Mistral language model (vision left out)"
    model_types = ("mistral3",)
    classes = ("Mistral3ForConditionalGeneration",)
    names = multimodal_names(DecoderFamily.projections)

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        if not super().detect(checkpoint):
            return False
        # Mistral3ForConditionalGeneration also wraps Mistral 4 (MoE), another family.
        text = checkpoint.config.get("text_config")
        return not isinstance(text, dict) or text.get("model_type") in TEXT_MODEL_TYPES

    def left_out(self, checkpoint: CheckpointInfo) -> list[str]:
        """The stored tensors outside the language model (vision tower, projector)."""
        return [n for n in checkpoint.shapes if not n.startswith("language_model.")]


@hookimpl
def loraformat_architectures() -> list[Mistral3]:
    return [Mistral3()]
