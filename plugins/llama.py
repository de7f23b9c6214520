"""LLaMA (Hugging Face layout): GQA, RoPE (default, linear and llama3 scaling), SwiGLU, RMSNorm.

Checkpoints saved by ``LlamaForCausalLM`` put the decoder under ``model.`` and the head at
``lm_head`` (absent when tied to ``model.embed_tokens``); a bare ``LlamaModel`` has no prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from loraformat.architecture import (
    SAME,
    ArchitectureBase,
    CheckpointInfo,
    DenseLayer,
    ExportModel,
    ExportOptions,
    ModelShape,
    NameTable,
    hookimpl,
)

from ._common import dense_from_shape, model_type_is
from ._decoder import base_spec, build, llama_cpp_qk_permutation, rope_from_config

LORAFORMAT_PLUGIN_API = 2

_PROJ = r"self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj"
_BLOCK = re.compile(rf"^(?:.*\.)?layers\.\d+\.(?:{_PROJ})$")
_EMBED = re.compile(r"^(?:.*\.)?embed_tokens$")


def _block_row(sub: str, gguf: str) -> tuple[str, str, str, str]:
    return (f"model.layers.{{bid}}.{sub}", SAME, f"blk.{{bid}}.{gguf}", SAME)


class Llama(ArchitectureBase):
    id = "llama"
    description = "LLaMA decoder (GQA, RoPE incl. llama3 scaling, SwiGLU)"
    targets = ("q_proj", "v_proj")
    gguf_architecture = "llama"
    ort_model_type = "bert"  # ONNX Runtime's optimizer has no llama type; its bert passes apply
    names = NameTable(
        ("checkpoint", "peft", "gguf", "mlx"),
        [
            _block_row("self_attn.q_proj", "attn_q"),
            _block_row("self_attn.k_proj", "attn_k"),
            _block_row("self_attn.v_proj", "attn_v"),
            _block_row("self_attn.o_proj", "attn_output"),
            _block_row("mlp.gate_proj", "ffn_gate"),
            _block_row("mlp.up_proj", "ffn_up"),
            _block_row("mlp.down_proj", "ffn_down"),
            ("model.embed_tokens", SAME, "token_embd", SAME),
            ("lm_head", SAME, "output", SAME),
        ],
        optional_prefix="model.",
    )

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        said = model_type_is(checkpoint.config, "llama", "Llama")
        if said is not None:
            return said
        names = set(checkpoint.shapes)
        has_blocks = any(
            n.endswith("mlp.gate_proj.weight") and _BLOCK.match(n.removesuffix(".weight"))
            for n in names
        )
        # LLaMA-named relatives (Qwen2: q/k/v biases; Qwen3/OLMo2: q/k norms) are not LLaMA.
        relatives = any(
            n.endswith(("q_proj.bias", "q_norm.weight", "k_norm.weight")) for n in names
        )
        return has_blocks and not relatives

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        shapes = checkpoint.shapes
        layers = []
        for name, shape in shapes.items():
            if not name.endswith(".weight"):
                continue
            path = name.removesuffix(".weight")
            bias = path + ".bias" if path + ".bias" in shapes else None
            if _BLOCK.match(path) or path == "lm_head":
                layers.append(dense_from_shape(path, shape, bias=bias))
            elif _EMBED.match(path):
                layers.append(dense_from_shape(path, shape, layout="in_out", kind="embedding"))
        return layers

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        return llama_cpp_qk_permutation(checkpoint, layer_path) if convention == "gguf" else None

    def model_shape(
        self, checkpoint: CheckpointInfo, what: str = "the LLaMA model shape"
    ) -> ModelShape:
        value = checkpoint.config_value
        heads = int(value("num_attention_heads", what=what))
        hidden = int(value("hidden_size", what=what))
        return ModelShape(
            num_layers=int(value("num_hidden_layers", default=0)),
            num_heads=heads,
            num_kv_heads=int(value("num_key_value_heads", default=heads)),
            head_dim=int(value("head_dim", default=hidden // heads)),
            hidden_size=hidden,
            vocab_size=int(value("vocab_size", default=0)),
        )

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        # LLaMA is the plain configuration of the shared decoder (no window, one rope).
        return build(base_spec(checkpoint, "LLaMA"), checkpoint, tensors, options)


@hookimpl
def loraformat_architectures() -> list[ArchitectureBase]:
    return [Llama()]


def rope_inv_freq(checkpoint: CheckpointInfo, head_dim: int) -> tuple[Any, float]:
    """(inverse frequencies, attention scaling) as transformers computes them for the config's
    ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (older)."""
    config = checkpoint.config
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope = rope_from_config(params, config, head_dim, checkpoint)
    return rope.inv_freq, rope.scaling
