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
    ArchitectureInfo,
    DenseLayer,
    ExportModel,
    ExportOptions,
    hookimpl,
)
from loraformat.errors import LoraformatError

from ._common import (
    causal_lm,
    config_value,
    decoder_export_model,
    dense_from_shape,
    find_prefix,
    load_tensors,
    model_type_is,
)

ARCH = "llama"
_PROJ = r"self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj"
_BLOCK = re.compile(rf"^(?P<prefix>.*?)layers\.(?P<n>\d+)\.(?P<rest>{_PROJ})$")
_EMBED = re.compile(r"^(?P<prefix>.*?)embed_tokens$")
_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# The prefix transformers uses in memory and on save (PEFT and MLX-LM names carry it too).
_CANONICAL_PREFIX = "model."


@hookimpl
def loraformat_architectures() -> list[ArchitectureInfo]:
    return [ArchitectureInfo(ARCH, "LLaMA decoder (GQA, RoPE incl. llama3 scaling, SwiGLU)")]


@hookimpl
def loraformat_detect(config: Mapping[str, Any], tensor_names: Sequence[str]) -> str | None:
    said = model_type_is(config, "llama", "Llama")
    if said is not None:
        return ARCH if said else None
    names = set(tensor_names)
    has_blocks = any(
        _BLOCK.match(n.removesuffix(".weight")) and n.endswith("mlp.gate_proj.weight")
        for n in names
    )
    # LLaMA-named relatives (Qwen2: q/k/v biases; Qwen3/OLMo2: q/k norms) are not LLaMA.
    relatives = any(n.endswith(("q_proj.bias", "q_norm.weight", "k_norm.weight")) for n in names)
    return ARCH if has_blocks and not relatives else None


@hookimpl
def loraformat_dense_layers(
    architecture: str, config: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> list[DenseLayer] | None:
    if architecture != ARCH:
        return None
    layers = []
    for name, shape in tensor_shapes.items():
        if not name.endswith(".weight"):
            continue
        path = name.removesuffix(".weight")
        bias = path + ".bias" if path + ".bias" in tensor_shapes else None
        if _BLOCK.match(path) or path == "lm_head":
            layers.append(dense_from_shape(path, shape, bias=bias))
        elif _EMBED.match(path):
            layers.append(dense_from_shape(path, shape, layout="in_out", kind="embedding"))
    return layers


@hookimpl
def loraformat_default_targets(architecture: str, config: Mapping[str, Any]) -> list[str] | None:
    return ["q_proj", "v_proj"] if architecture == ARCH else None


def _canonical(path: str) -> str | None:
    """The layer path without its prefix: ``layers.0.self_attn.q_proj``, ``embed_tokens``."""
    m = _BLOCK.match(path)
    if m:
        return path[len(m["prefix"]) :]
    m = _EMBED.match(path)
    if m:
        return "embed_tokens"
    return None


@hookimpl
def loraformat_foreign_name(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> str | None:
    if architecture != ARCH or convention not in ("peft", "gguf", "mlx"):
        return None
    if layer_path == "lm_head":
        return "output" if convention == "gguf" else "lm_head"
    rest = _canonical(layer_path)
    if rest is None:
        return None
    if convention in ("peft", "mlx"):
        return _CANONICAL_PREFIX + rest
    if rest == "embed_tokens":
        return "token_embd"
    _, n, sub = rest.split(".", 2)
    return f"blk.{n}.{_GGUF_BLOCK[sub]}"


@hookimpl
def loraformat_layer_path(
    architecture: str, config: Mapping[str, Any], foreign_name: str, convention: str
) -> str | None:
    """Layer paths are returned with the ``model.`` prefix transformers saves with."""
    if architecture != ARCH:
        return None
    if convention in ("peft", "mlx"):
        name = foreign_name.removeprefix("base_model.model.")
        if name == "lm_head":
            return name
        if not name.startswith(_CANONICAL_PREFIX):
            return None
        rest = _canonical(name)
        return _CANONICAL_PREFIX + rest if rest and name == _CANONICAL_PREFIX + rest else None
    if convention == "gguf":
        name = foreign_name.removesuffix(".weight")
        if name == "output":
            return "lm_head"
        if name == "token_embd":
            return _CANONICAL_PREFIX + "embed_tokens"
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", name)
        if m:
            for rest, g in _GGUF_BLOCK.items():
                if m[2] == g:
                    return f"{_CANONICAL_PREFIX}layers.{m[1]}.{rest}"
    return None


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


@hookimpl
def loraformat_foreign_row_permutation(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> Sequence[int] | None:
    if architecture != ARCH or convention != "gguf":
        return None
    rest = _canonical(layer_path) or ""
    if not rest.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return None
    what = "llama.cpp's q/k row permutation"
    n_head = int(config_value(config, "num_attention_heads", what=what))
    hidden = int(config_value(config, "hidden_size", what=what))
    head_dim = int(config_value(config, "head_dim", default=hidden // n_head))
    if rest.endswith("k_proj"):
        # The converter passes n_head_kv, which replaces n_head whenever it differs (GQA).
        n_head = int(config_value(config, "num_key_value_heads", default=n_head))
    return gguf_permutation(n_head * head_dim, n_head)


# -- export module -------------------------------------------------------------------------------


def rope_inv_freq(config: Mapping[str, Any], head_dim: int) -> tuple[Any, float]:
    """(inverse frequencies, attention scaling) as transformers computes them for the config's
    ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (older)."""
    import torch

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
    raise LoraformatError(
        "config.json",
        f"rope type {kind!r} is not supported by the llama export module "
        "(supported: default, linear, llama3)",
    )


def _build(
    config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions
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
    n_layer = int(config_value(config, "num_hidden_layers", what=what))
    n_head = int(config_value(config, "num_attention_heads", what=what))
    n_kv = int(config_value(config, "num_key_value_heads", default=n_head))
    embed = tensors[prefix + "embed_tokens.weight"]
    vocab, d = int(embed.shape[0]), int(embed.shape[1])
    head_dim = int(config_value(config, "head_dim", default=d // n_head))
    inner = int(tensors[prefix + "layers.0.mlp.gate_proj.weight"].shape[0])
    eps = float(config_value(config, "rms_norm_eps", default=1e-6))
    attn_bias = prefix + "layers.0.self_attn.q_proj.bias" in tensors
    mlp_bias = prefix + "layers.0.mlp.gate_proj.bias" in tensors
    act_name = config_value(config, "hidden_act", default="silu")
    if act_name != "silu":
        raise LoraformatError("config.json", f"LLaMA hidden_act {act_name!r} is not supported")
    inv_freq, rope_scale = rope_inv_freq(config, head_dim)
    tied = "lm_head.weight" not in tensors or config.get("tie_word_embeddings") is True
    if "lm_head.weight" not in tensors and config.get("tie_word_embeddings") is False:
        raise LoraformatError(
            None, "LLaMA checkpoint has no lm_head.weight and tie_word_embeddings is false"
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


@hookimpl
def loraformat_export_model(
    architecture: str, config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel | None:
    if architecture != ARCH:
        return None
    return _build(config, tensors, options)
