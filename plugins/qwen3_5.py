"""Qwen3.5 dense (Hugging Face ``Qwen3_5ForCausalLM``, model_type ``qwen3_5_text``, and the
language model of ``Qwen3_5ForConditionalGeneration``, model_type ``qwen3_5``).

A hybrid decoder: most layers mix tokens with a Gated DeltaNet linear attention (``linear_attn``:
``in_proj_qkv`` → causal depthwise conv1d → L2-normalised q/k → the gated delta rule over a
recurrent state; ``in_proj_z`` gates an RMSNorm of the result; ``in_proj_a``/``in_proj_b`` give
the decay and the update rate; ``out_proj``), every ``full_attention_interval``-th (4th) layer
with gated full attention (``q_proj`` gives each head's query and an output gate, per-head q/k
norms, partial rotary). Every RMSNorm but the linear attention's gated one scales by ``(1 + w)``.

State between calls: a linear layer carries ``conv_state`` [batch, conv channels, kernel - 1]
and ``recurrent_state`` [batch, value heads, key head size, value head size], both replaced each
call; a full layer carries key/value — the names ONNX Runtime GenAI's builder gives them.

llama.cpp converts both checkpoints as ``qwen35`` (Qwen3_5TextModel, no q/k permutation, the
``language_model.`` level dropped). Where the linear attention has more value heads than key
heads, it reorders the value heads from grouped-by-key-head to tiled: the rows of
``in_proj_qkv``'s value part, ``in_proj_z``, ``in_proj_a``, ``in_proj_b`` (a row permutation
here), and the input columns of ``out_proj`` (a column permutation). MLX-LM runs only the
multimodal config (``qwen3_5``), under ``language_model.model.``; it has no ``qwen3_5_text``
model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    BATCH,
    FULL,
    GGUF_PROJECTIONS,
    LINEAR,
    PREFIX,
    SPLIT_ATTENTION,
    SPLIT_MLP,
    CacheTensor,
    DecoderFamily,
    DecoderSpec,
    LayerCache,
    base_spec,
    kv_cache,
    language_model,
)
from loraformat.architecture.names import SAME, NameTable
from loraformat.architecture.plugin_tools import find_prefix
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2
LINEAR_ATTENTION = (
    "linear_attn.in_proj_qkv",
    "linear_attn.in_proj_z",
    "linear_attn.in_proj_b",
    "linear_attn.in_proj_a",
    "linear_attn.out_proj",
)
#: llama.cpp's names for the linear attention's projections (gguf-py's tensor map, qwen3.5).
GGUF_LINEAR = {
    "linear_attn.in_proj_qkv": "attn_qkv",
    "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_b": "ssm_beta",
    "linear_attn.in_proj_a": "ssm_alpha",
    "linear_attn.out_proj": "ssm_out",
}
#: The config keys of the linear attention's sizes (``spec.extras`` of its layers).
LINEAR_SIZES = (
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
)
PROJECTIONS = SPLIT_ATTENTION + LINEAR_ATTENTION + SPLIT_MLP
#: Where the multimodal checkpoint keeps its decoder (stored and in memory alike), and its head.
MULTIMODAL_PREFIX, MULTIMODAL_HEAD = "model.language_model.", "lm_head"


def _gguf(projection: str) -> str:
    return GGUF_LINEAR.get(projection) or GGUF_PROJECTIONS[projection]


def text_names() -> NameTable:
    """``Qwen3_5ForCausalLM``: PEFT names the checkpoint path; llama.cpp's ``blk.N``; MLX-LM has
    no text-only Qwen3.5 (no mlx column)."""
    block = "model.layers.{bid}."
    rows: list[tuple[str, str | None, str | None, str | None]] = [
        (block + p, SAME, "blk.{bid}." + _gguf(p), None) for p in PROJECTIONS
    ]
    rows.append(("model.embed_tokens", SAME, "token_embd", None))
    rows.append(("lm_head", SAME, "output", None))
    return NameTable(("checkpoint", "peft", "gguf", "mlx"), rows, optional_prefix=PREFIX)


def multimodal_names() -> NameTable:
    """``Qwen3_5ForConditionalGeneration``: stored and in memory under
    ``model.language_model.`` (PEFT's path), head ``lm_head``; llama.cpp drops the
    ``language_model.`` level; MLX-LM's Qwen3.5 model holds it as ``language_model.model.``."""
    block = MULTIMODAL_PREFIX + "layers.{bid}."
    rows: list[tuple[str, str | None, str | None, str | None]] = [
        (block + p, SAME, "blk.{bid}." + _gguf(p), "language_model.model.layers.{bid}." + p)
        for p in PROJECTIONS
    ]
    rows.append((MULTIMODAL_PREFIX + "embed_tokens", SAME, "token_embd",
                 "language_model.model.embed_tokens"))
    rows.append((MULTIMODAL_HEAD, SAME, "output", "language_model.lm_head"))
    return NameTable(("checkpoint", "peft", "gguf", "mlx"), rows)


def linear_sizes(checkpoint: CheckpointInfo) -> dict[str, int]:
    """The linear attention's sizes from the (language model's) config."""
    what = "the Qwen3.5 linear attention"
    return {k: int(checkpoint.config_value(k, what=what)) for k in LINEAR_SIZES}


def layer_types(checkpoint: CheckpointInfo) -> tuple[str, ...]:
    """Per layer, ``linear_attention`` or ``full_attention``: the config's ``layer_types``, else
    every ``full_attention_interval``-th layer full (transformers' default, 4)."""
    n_layer = int(checkpoint.config_value("num_hidden_layers", what="the Qwen3.5 layer types"))
    types = checkpoint.config.get("layer_types")
    if types:
        unknown = sorted(set(types) - {LINEAR, FULL})
        if unknown:
            raise checkpoint.config_error(f"Qwen3.5 layer type {unknown[0]!r} is not supported")
        return tuple(types[:n_layer])
    interval = int(checkpoint.config.get("full_attention_interval") or 4)
    return tuple(FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layer))


def value_head_order(n_k: int, n_v: int, head_dim: int) -> list[int]:
    """llama.cpp's value-head reorder as source-row indices: rows grouped by key head
    (n_k, n_v/n_k, head_dim) are read with the first two axes swapped (tiled order)."""
    per_k = n_v // n_k
    return [(kh * per_k + r) * head_dim + d
            for r in range(per_k) for kh in range(n_k) for d in range(head_dim)]


class Qwen3_5(DecoderFamily):
    id = "qwen3_5"
    description = (
        "Qwen3.5 decoder (Gated DeltaNet linear attention with conv + recurrent state, gated "
        "full attention every 4th layer, partial rotary, (1 + w) RMSNorms)"
    )
    model_types = ("qwen3_5_text",)
    classes = ("Qwen3_5ForCausalLM", "Qwen3_5TextModel")
    projections = PROJECTIONS
    names = text_names()
    # PEFT has no default target_modules for Qwen3.5; LLaMA's (the full layers' q/v).
    targets = ("q_proj", "v_proj")
    gguf_architecture = "qwen35"
    # ONNX Runtime's transformer optimizer knows no Gated DeltaNet: no fusions.
    ort_model_type = None

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        # The class decides first: PEFT's adapter config says model_type "qwen3_5" (the
        # transformers module, which is the multimodal model's type) for both models.
        archs = checkpoint.config.get("architectures") or []
        if archs:
            return any(str(a) in self.classes for a in archs)
        return super().detect(checkpoint)

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        # No other family has a linear_attn.in_proj_qkv; the multimodal one keeps it under
        # model.language_model.
        return any(
            n.endswith("linear_attn.in_proj_qkv.weight") for n in checkpoint.shapes
        ) and not any(n.startswith(MULTIMODAL_PREFIX) for n in checkpoint.shapes)

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        if convention != "gguf" or ".linear_attn." not in layer_path:
            return None
        text = language_model(checkpoint)
        sizes = linear_sizes(text)
        n_k, n_v = sizes["linear_num_key_heads"], sizes["linear_num_value_heads"]
        if n_k == n_v:
            return None
        v_dim = sizes["linear_value_head_dim"]
        if layer_path.endswith("in_proj_qkv"):
            keys = 2 * n_k * sizes["linear_key_head_dim"]
            return list(range(keys)) + [keys + i for i in value_head_order(n_k, n_v, v_dim)]
        if layer_path.endswith("in_proj_z"):
            return value_head_order(n_k, n_v, v_dim)
        if layer_path.endswith(("in_proj_a", "in_proj_b")):
            return value_head_order(n_k, n_v, 1)
        return None

    def column_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        if convention != "gguf" or not layer_path.endswith("linear_attn.out_proj"):
            return None
        sizes = linear_sizes(language_model(checkpoint))
        n_k, n_v = sizes["linear_num_key_heads"], sizes["linear_num_value_heads"]
        if n_k == n_v:
            return None
        return value_head_order(n_k, n_v, sizes["linear_value_head_dim"])

    def left_out(self, checkpoint: CheckpointInfo) -> list[str]:
        """The stored tensors merge and export leave as they are: those outside the decoder and
        its head — the multi-token-prediction head (``mtp.``) the published checkpoints carry, a
        multimodal checkpoint's vision tower and merger."""
        prefix = find_prefix(list(checkpoint.shapes), r"embed_tokens\.weight$") or ""
        return [n for n in checkpoint.shapes if not n.startswith((prefix, "lm_head."))]

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        # The core asks with the checkpoint as it is (the emitter's question): a multimodal
        # config is read as its language model's here.
        text = language_model(checkpoint)
        kinds = layer_types(text)
        sizes = linear_sizes(text)
        n_k, n_v = sizes["linear_num_key_heads"], sizes["linear_num_value_heads"]
        dk, dv = sizes["linear_key_head_dim"], sizes["linear_value_head_dim"]
        linear = LayerCache((
            CacheTensor("conv_state", (BATCH, 2 * n_k * dk + n_v * dv,
                                       sizes["linear_conv_kernel_dim"] - 1)),
            CacheTensor("recurrent_state", (BATCH, n_v, dk, dv)),
        ))
        spec = base_spec(text, "Qwen3.5", qk_norm=True, gemma_norm=True, layer_kinds=kinds,
                         extras=sizes)
        full = kv_cache(spec.n_kv, spec.head_dim)
        return replace(spec, caches=tuple(linear if k == LINEAR else full for k in kinds))

    def blocks(self, spec: DecoderSpec) -> Any:
        from loraformat.architecture.decoder.blocks import Blocks

        from ._gated_deltanet import GatedAttention, GatedDeltaNet, Qwen3_5Layer

        return Blocks(mixers={FULL: GatedAttention, LINEAR: GatedDeltaNet}, layer=Qwen3_5Layer)


class Qwen3_5Multimodal(Qwen3_5):
    id = "qwen3_5_multimodal"
    description = "Qwen3.5 multimodal: its Qwen3.5 language model (vision tower left out)"
    model_types = ("qwen3_5",)
    classes = ("Qwen3_5ForConditionalGeneration",)
    names = multimodal_names()

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return any(
            n.startswith(MULTIMODAL_PREFIX) and n.endswith("linear_attn.in_proj_qkv.weight")
            for n in checkpoint.shapes
        )



@hookimpl
def loraformat_architectures() -> list[Qwen3_5]:
    return [Qwen3_5(), Qwen3_5Multimodal()]
