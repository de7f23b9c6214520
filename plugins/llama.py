"""LLaMA (Hugging Face layout): GQA, RoPE (default, linear and llama3 scaling), SwiGLU, RMSNorm.

Checkpoints saved by ``LlamaForCausalLM`` put the decoder under ``model.`` and the head at
``lm_head`` (absent when tied to ``model.embed_tokens``); a bare ``LlamaModel`` has no prefix.
"""

from __future__ import annotations

import math
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

from ._common import (
    causal_lm,
    decoder_export_model,
    dense_from_shape,
    find_prefix,
    load_tensors,
    model_type_is,
)

LORAFORMAT_PLUGIN_API = 2

_PROJ = r"self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj"
_BLOCK = re.compile(rf"^(?:.*\.)?layers\.\d+\.(?:{_PROJ})$")
_EMBED = re.compile(r"^(?:.*\.)?embed_tokens$")
_ROTARY = ("self_attn.q_proj", "self_attn.k_proj")


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
        if convention != "gguf" or not layer_path.endswith(_ROTARY):
            return None
        shape = self.model_shape(checkpoint, what="llama.cpp's q/k row permutation")
        # The converter passes n_head_kv for k, which replaces n_head whenever it differs (GQA).
        heads = shape.num_heads if layer_path.endswith("q_proj") else shape.num_kv_heads
        return gguf_permutation(heads * shape.head_dim, heads)

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
        return _build(checkpoint, tensors, options)


@hookimpl
def loraformat_architectures() -> list[ArchitectureBase]:
    return [Llama()]


def gguf_permutation(rows: int, n_head: int) -> list[int]:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py) as source-row indices: rows grouped as
    (n_head, 2, head_dim/2) have their last two axes swapped, turning HF's half-split rotary
    layout into GGML's interleaved one."""
    half = rows // n_head // 2
    return [
        h * 2 * half + pair * half + j
        for h in range(n_head)
        for j in range(half)
        for pair in (0, 1)
    ]


# -- export module -------------------------------------------------------------------------------


def rope_inv_freq(checkpoint: CheckpointInfo, head_dim: int) -> tuple[Any, float]:
    """(inverse frequencies, attention scaling) as transformers computes them for the config's
    ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (older)."""
    import torch

    config = checkpoint.config
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise checkpoint.config_error(
        f"rope type {kind!r} is not supported by the llama export module "
        "(supported: default, linear, llama3)"
    )


def _build(
    checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel:
    import torch
    from torch import nn

    from loraformat.architecture.modules import (
        Dense,
        RMSNorm,
        additive_mask,
        apply_rotary,
        attend,
        attention_mask_4d,
    )

    names = list(tensors)
    prefix = find_prefix(names, r"layers\.\d+\.self_attn\.q_proj\.weight$")
    if prefix is None:
        prefix = find_prefix(names, r"embed_tokens\.weight$") or ""
    what = "building the LLaMA export module"
    config = checkpoint.config
    value = checkpoint.config_value
    n_layer = int(value("num_hidden_layers", what=what))
    n_head = int(value("num_attention_heads", what=what))
    n_kv = int(value("num_key_value_heads", default=n_head))
    embed = tensors[prefix + "embed_tokens.weight"]
    vocab, d = int(embed.shape[0]), int(embed.shape[1])
    head_dim = int(value("head_dim", default=d // n_head))
    inner = int(tensors[prefix + "layers.0.mlp.gate_proj.weight"].shape[0])
    eps = float(value("rms_norm_eps", default=1e-6))
    attn_bias = prefix + "layers.0.self_attn.q_proj.bias" in tensors
    mlp_bias = prefix + "layers.0.mlp.gate_proj.bias" in tensors
    act_name = value("hidden_act", default="silu")
    if act_name != "silu":
        raise checkpoint.config_error(f"LLaMA hidden_act {act_name!r} is not supported")
    inv_freq, rope_scale = rope_inv_freq(checkpoint, head_dim)
    tied = "lm_head.weight" not in tensors or config.get("tie_word_embeddings") is True
    if "lm_head.weight" not in tensors and config.get("tie_word_embeddings") is False:
        raise checkpoint.error(
            "LLaMA checkpoint has no lm_head.weight and tie_word_embeddings is false"
        )

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Not persistent: derived from the config, not a checkpoint tensor.
            self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = Dense(d, n_head * head_dim, bias=attn_bias)
            self.k_proj = Dense(d, n_kv * head_dim, bias=attn_bias)
            self.v_proj = Dense(d, n_kv * head_dim, bias=attn_bias)
            self.o_proj = Dense(n_head * head_dim, d, bias=attn_bias)

        def forward(self, x, mask_bias, position_ids, inv_freq, past):
            b, s, _ = x.shape
            q = self.q_proj(x).reshape(b, s, n_head, head_dim).transpose(1, 2)
            k = self.k_proj(x).reshape(b, s, n_kv, head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(b, s, n_kv, head_dim).transpose(1, 2)
            q = apply_rotary(q, position_ids, inv_freq, rope_scale)
            k = apply_rotary(k, position_ids, inv_freq, rope_scale)
            if past is not None:
                k = torch.cat((past[0], k), dim=-2)
                v = torch.cat((past[1], v), dim=-2)
            out = attend(q, k, v, mask_bias, head_dim**-0.5)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, n_head * head_dim)), (k, v)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = Dense(d, inner, bias=mlp_bias)
            self.up_proj = Dense(d, inner, bias=mlp_bias)
            self.down_proj = Dense(inner, d, bias=mlp_bias)

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attention()
            self.mlp = MLP()
            self.input_layernorm = RMSNorm(d, eps)
            self.post_attention_layernorm = RMSNorm(d, eps)

        def forward(self, x, mask_bias, position_ids, inv_freq, past):
            a, present = self.self_attn(
                self.input_layernorm(x), mask_bias, position_ids, inv_freq, past
            )
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x)), present

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList(Layer() for _ in range(n_layer))
            self.norm = RMSNorm(d, eps)
            self.rotary_emb = Rotary()

        def embedding_weight(self):
            return self.embed_tokens.weight

        def hidden(self, input_ids, attention_mask, position_ids, pairs):
            b, s = input_ids.shape
            past_len = pairs[0][0].shape[2] if pairs[0] is not None else 0
            if position_ids is None:
                position_ids = (torch.arange(s, device=input_ids.device) + past_len)[None, :]
                position_ids = position_ids.expand(b, s)
            mask_bias = additive_mask(
                attention_mask_4d(attention_mask, b, s, past_len, input_ids.device)
            )
            x = self.embed_tokens(input_ids)
            presents = []
            for layer, past in zip(self.layers, pairs, strict=True):
                x, present = layer(x, mask_bias, position_ids, self.rotary_emb.inv_freq, past)
                presents.append(present)
            return self.norm(x), presents

    lm_head = None if tied else Dense(d, vocab, bias="lm_head.bias" in tensors)
    module = causal_lm(Body(), prefix, lm_head, options.with_past, n_layer)
    load_tensors(module, tensors, "LLaMA checkpoint")
    dtype = next(module.parameters()).dtype
    return decoder_export_model(module, n_layer, n_kv, head_dim, options.with_past, vocab, dtype)
