"""The plugin side of a described decoder: :class:`DecoderFamily` answers the plugin questions
every such family shares (dense layers, name table, llama.cpp's q/k row order, model shape,
layer repeat, export module) from the family's :class:`~.spec.DecoderSpec` and data.

Torch-free: the export module's blocks (:mod:`.blocks`) are imported only to build one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from loraformat.architecture.layers import DenseLayer, ExportModel, ExportOptions, FusedPart
from loraformat.architecture.names import SAME, NameTable
from loraformat.architecture.plugin_tools import dense_from_shape, find_prefix
from loraformat.architecture.protocol import (
    ArchitectureBase,
    CheckpointInfo,
    LayerRepeat,
    ModelShape,
)

from .config import PREFIX, head_path, heads, language_model, model_type, shape_of
from .spec import DecoderSpec

#: llama.cpp's tensor names for the projections of a block, by checkpoint suffix.
GGUF_PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: llama.cpp keeps gate and up fused in ffn_up
    "mlp.down_proj": "ffn_down",
}
SPLIT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FUSED_ATTENTION = ("self_attn.qkv_proj", "self_attn.o_proj")
SPLIT_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED_MLP = ("mlp.gate_up_proj", "mlp.down_proj")


def decoder_names(
    projections: Sequence[str],
    lm_head_in_gguf: bool = True,
    gguf: Mapping[str, str] | None = None,
) -> NameTable:
    """The NameTable of a decoder whose blocks have ``projections`` (checkpoint suffixes).

    PEFT and MLX-LM use the checkpoint path (both name modules as transformers does); llama.cpp
    uses :data:`GGUF_PROJECTIONS`, updated by ``gguf`` (a family's own projections).
    ``lm_head_in_gguf=False`` for families llama.cpp always ties (Gemma 2 has no ``output``
    tensor).
    """
    gguf_names = {**GGUF_PROJECTIONS, **(gguf or {})}
    block = "model.layers.{bid}."
    rows: list[tuple[str, str | None, str | None, str | None]] = [
        (block + p, SAME, "blk.{bid}." + gguf_names[p], SAME) for p in projections
    ]
    rows.append(("model.embed_tokens", SAME, "token_embd", SAME))
    rows.append(("lm_head", SAME, "output" if lm_head_in_gguf else None, SAME))
    return NameTable(("checkpoint", "peft", "gguf", "mlx"), rows, optional_prefix=PREFIX)


_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def dense_layers(
    checkpoint: CheckpointInfo,
    projections: Sequence[str],
    parts: Mapping[str, tuple[FusedPart, ...]],
) -> list[DenseLayer]:
    """Every block projection in ``projections``, the embedding table and an untied ``lm_head``,
    in checkpoint order. ``parts``: the fused parts of a projection suffix (Phi-3's qkv_proj)."""
    shapes = checkpoint.shapes
    # A multimodal checkpoint's decoder sits under its own prefix (the embedding's); its vision
    # tower may have blocks of the same names, which are not the decoder's.
    prefix = find_prefix(list(shapes), r"embed_tokens\.weight$")
    layers = []
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        path = name.removesuffix(".weight")
        bias = path + ".bias" if path + ".bias" in shapes else None
        m = _BLOCK.match(path)
        if m and m[2] in projections:
            if prefix is None or path.startswith(prefix + "layers."):
                layers.append(dense_from_shape(path, shape, parts=parts.get(m[2], ()), bias=bias))
        elif path == head_path(prefix or ""):
            layers.append(dense_from_shape(path, shape, bias=bias))
        elif prefix is not None and path == prefix + "embed_tokens":
            layers.append(dense_from_shape(path, shape, layout="in_out", kind="embedding"))
    return layers


def gguf_permutation(rows: int, n_head: int) -> list[int]:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py, LlamaModel) as source-row indices: rows
    grouped as (n_head, 2, head_dim/2) have their last two axes swapped, turning HF's half-split
    rotary layout into GGML's interleaved one."""
    half = rows // n_head // 2
    return [
        h * 2 * half + pair * half + j
        for h in range(n_head)
        for j in range(half)
        for pair in (0, 1)
    ]


def llama_cpp_qk_permutation(checkpoint: CheckpointInfo, layer_path: str) -> list[int] | None:
    """The q/k row order of families llama.cpp converts through LlamaModel (which permutes);
    None for any other layer."""
    if not layer_path.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return None
    n_head, n_kv, head_dim = heads(language_model(checkpoint), "llama.cpp's q/k row permutation")
    if layer_path.endswith("k_proj"):
        # The converter passes n_head_kv, which replaces n_head whenever it differs (GQA).
        n_head = n_kv
    return gguf_permutation(n_head * head_dim, n_head)


class DecoderFamily(ArchitectureBase):
    """An :class:`ArchitectureBase` for a family described by a :class:`DecoderSpec`: a subclass
    sets the data (``id``, ``description``, ``model_types``, ``classes``, ``projections``,
    ``names``, ``targets``, ``gguf_architecture``, ``ort_model_type``), writes :meth:`spec`, and
    may write :meth:`detect_tensors` and replace building blocks (:meth:`blocks`)."""

    #: config ``model_type`` values and ``architectures`` class names that are this family.
    model_types: ClassVar[tuple[str, ...]] = ()
    classes: ClassVar[tuple[str, ...]] = ()
    #: Block projection suffixes that can carry an adapter, in checkpoint order.
    projections: ClassVar[tuple[str, ...]] = SPLIT_ATTENTION + SPLIT_MLP
    #: Whether llama.cpp converts the family through LlamaModel, which permutes the q/k rows.
    llama_cpp_permutes: ClassVar[bool] = False

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        said = model_type(checkpoint, self.model_types, self.classes)
        if said is not None:
            return said
        # No config: only the tensors can tell, and only for families whose tensors differ.
        return bool(checkpoint.shapes) and self.detect_tensors(checkpoint)

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        """Whether tensor names alone prove the family (False when they cannot)."""
        return False

    def parts(self, checkpoint: CheckpointInfo) -> dict[str, tuple[FusedPart, ...]]:
        """The fused parts of a projection suffix (none unless the family fuses)."""
        return {}

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        return dense_layers(checkpoint, self.projections, self.parts(checkpoint))

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        if self.llama_cpp_permutes and convention == "gguf":
            return llama_cpp_qk_permutation(checkpoint, layer_path)
        return None

    def model_shape(self, checkpoint: CheckpointInfo) -> ModelShape | None:
        return shape_of(language_model(checkpoint))

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        """The family's description, from the language model's config (see
        :func:`language_model`: called with that, never with a multimodal config)."""
        raise NotImplementedError

    def blocks(self, spec: DecoderSpec) -> Any:
        """The building blocks of the export module
        (:class:`~loraformat.architecture.decoder.blocks.Blocks`): the defaults, unless the
        family replaces some. Called only when a module is built (blocks import torch)."""
        from .blocks import Blocks

        return Blocks()

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        from .blocks import build

        text = language_model(checkpoint)
        spec = self.spec(text)
        return build(spec, text, tensors, options, self.blocks(spec))

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        # A layer's graph depends on its index only through its signature (kind, window, rope,
        # shape, cache).
        spec = self.spec(language_model(checkpoint))
        depth = "num_hidden_layers"
        if language_model(checkpoint) is not checkpoint:
            depth = "text_config." + depth
        return LayerRepeat(spec.layer_signatures(), depth)
