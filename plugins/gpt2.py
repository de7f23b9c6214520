"""GPT-2 (Hugging Face layout): Conv1D weights stored [in, out], fused q/k/v in ``c_attn``.

Checkpoints saved by ``GPT2LMHeadModel`` prefix every tensor with ``transformer.``; the original
OpenAI hub checkpoints do not. Both are read; the LM head is tied to ``wte`` (not stored).
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
    FusedPart,
    hookimpl,
)

from ._common import (
    causal_lm,
    config_value,
    decoder_export_model,
    dense_from_shape,
    find_prefix,
    load_tensors,
    model_type_is,
)

ARCH = "gpt2"
_BLOCK = re.compile(
    r"^(?P<prefix>.*?)h\.(?P<n>\d+)\.(?P<rest>attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"
)
_TOP = re.compile(r"^(?P<prefix>.*?)(?P<rest>wte|wpe)$")
_GGUF_BLOCK = {
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_GGUF_TOP = {"wte": "token_embd", "wpe": "position_embd"}
# The prefix ``transformers`` uses in memory and on save (PEFT names carry it too).
_CANONICAL_PREFIX = "transformer."


@hookimpl
def loraformat_architectures() -> list[ArchitectureInfo]:
    return [ArchitectureInfo(ARCH, "GPT-2 decoder (Hugging Face layout, Conv1D weights)")]


@hookimpl
def loraformat_detect(config: Mapping[str, Any], tensor_names: Sequence[str]) -> str | None:
    said = model_type_is(config, "gpt2", "GPT2")
    if said is not None:
        return ARCH if said else None
    return (
        ARCH
        if any(_BLOCK.match(n[: -len(".weight")]) for n in tensor_names if n.endswith(".weight"))
        else None
    )


def _n_embd(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    if config.get("n_embd"):
        return int(config["n_embd"])
    return int(shapes[prefix + "h.0.attn.c_attn.weight"][0])


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
        path = name[: -len(".weight")]
        bias = path + ".bias" if path + ".bias" in tensor_shapes else None
        m = _BLOCK.match(path)
        if m:
            parts: tuple[FusedPart, ...] = ()
            if m["rest"] == "attn.c_attn":
                d = int(shape[1]) // 3
                parts = (
                    FusedPart("q", 0, d),
                    FusedPart("k", d, 2 * d),
                    FusedPart("v", 2 * d, 3 * d),
                )
            layers.append(dense_from_shape(path, shape, layout="in_out", parts=parts, bias=bias))
        elif _TOP.match(path):
            layers.append(dense_from_shape(path, shape, layout="in_out", kind="embedding"))
        elif path == "lm_head" and config.get("tie_word_embeddings") is False:
            layers.append(dense_from_shape(path, shape, bias=bias))
    return layers


@hookimpl
def loraformat_default_targets(architecture: str, config: Mapping[str, Any]) -> list[str] | None:
    return ["c_attn"] if architecture == ARCH else None


def _split(path: str) -> tuple[str, str] | None:
    """(prefix, canonical suffix) of a layer path: ("transformer.", "h.0.attn.c_attn")."""
    m = _BLOCK.match(path)
    if m:
        return m["prefix"], path[len(m["prefix"]) :]
    m = _TOP.match(path)
    if m and m["prefix"] in ("", _CANONICAL_PREFIX):
        return m["prefix"], m["rest"]
    return None


@hookimpl
def loraformat_foreign_name(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> str | None:
    if architecture != ARCH:
        return None
    if layer_path == "lm_head":
        return {"peft": "lm_head", "gguf": "output", "mlx": None}.get(convention)
    split = _split(layer_path)
    if split is None:
        return None
    _, rest = split
    if convention == "peft":
        return _CANONICAL_PREFIX + rest
    if convention == "mlx":  # mlx_lm's gpt2 keeps HF names under ``model.`` (its sanitize adds it)
        return "model." + rest
    if convention == "gguf":
        if rest in _GGUF_TOP:
            return _GGUF_TOP[rest]
        n, sub = rest.split(".", 2)[1], rest.split(".", 2)[2]
        return f"blk.{n}.{_GGUF_BLOCK[sub]}"
    return None


@hookimpl
def loraformat_layer_path(
    architecture: str, config: Mapping[str, Any], foreign_name: str, convention: str
) -> str | None:
    """Layer paths are returned with the ``transformer.`` prefix transformers saves with."""
    if architecture != ARCH:
        return None
    name = foreign_name
    if convention == "peft":
        name = name.removeprefix("base_model.model.")
        if name == "lm_head":
            return name
        split = _split(name)
        return _CANONICAL_PREFIX + split[1] if split else None
    if convention == "mlx":
        split = _split(name.removeprefix("model.")) if name.startswith("model.") else None
        return _CANONICAL_PREFIX + split[1] if split and split[0] == "" else None
    if convention == "gguf":
        name = name.removesuffix(".weight")
        if name == "output":
            return "lm_head"
        for rest, g in _GGUF_TOP.items():
            if name == g:
                return _CANONICAL_PREFIX + rest
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", name)
        if m:
            for rest, g in _GGUF_BLOCK.items():
                if m[2] == g:
                    return f"{_CANONICAL_PREFIX}h.{m[1]}.{rest}"
    return None


@hookimpl
def loraformat_foreign_row_permutation(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> Sequence[int] | None:
    return None  # llama.cpp stores GPT-2's weights without reordering rows


# -- export module -------------------------------------------------------------------------------


def _build(
    config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel:
    import torch
    from torch import nn

    from loraformat.architecture.modules import Dense, additive_mask, attend, attention_mask_4d

    names = list(tensors)
    prefix = find_prefix(names, r"h\.\d+\.attn\.c_attn\.weight$")
    if prefix is None:
        prefix = find_prefix(names, r"wte\.weight$") or ""
    what = "building the GPT-2 export module"
    n_layer = int(config_value(config, "n_layer", "num_hidden_layers", what=what))
    n_head = int(config_value(config, "n_head", "num_attention_heads", what=what))
    d = int(tensors[prefix + "wte.weight"].shape[1])
    vocab = int(tensors[prefix + "wte.weight"].shape[0])
    n_pos = int(tensors[prefix + "wpe.weight"].shape[0])
    inner = int(tensors[prefix + "h.0.mlp.c_fc.weight"].shape[1])
    eps = float(config_value(config, "layer_norm_epsilon", default=1e-5))
    head_dim = d // n_head
    act_name = config_value(config, "activation_function", default="gelu_new")
    acts = {
        "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
        "gelu": nn.functional.gelu,
        "relu": nn.functional.relu,
    }
    if act_name not in acts:
        from loraformat.errors import LoraformatError

        raise LoraformatError(
            "config.json", f"GPT-2 activation_function {act_name!r} is not supported"
        )
    act = acts[act_name]
    scale_weights = bool(config_value(config, "scale_attn_weights", default=True))
    by_layer = bool(config_value(config, "scale_attn_by_inverse_layer_idx", default=False))

    class Attention(nn.Module):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.c_attn = Dense(d, 3 * d, layout="in_out")
            self.c_proj = Dense(d, d, layout="in_out")
            self.scale = (1 / math.sqrt(head_dim) if scale_weights else 1.0) / (
                index + 1 if by_layer else 1
            )

        def forward(self, x, mask_bias, past):
            b, s, _ = x.shape
            q, k, v = self.c_attn(x).split(d, dim=-1)
            q, k, v = (t.reshape(b, s, n_head, head_dim).transpose(1, 2) for t in (q, k, v))
            if past is not None:
                k = torch.cat((past[0], k), dim=-2)
                v = torch.cat((past[1], v), dim=-2)
            out = attend(q, k, v, mask_bias, self.scale).transpose(1, 2).reshape(b, s, d)
            return self.c_proj(out), (k, v)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = Dense(d, inner, layout="in_out")
            self.c_proj = Dense(inner, d, layout="in_out")

        def forward(self, x):
            return self.c_proj(act(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(d, eps=eps)
            self.attn = Attention(index)
            self.ln_2 = nn.LayerNorm(d, eps=eps)
            self.mlp = MLP()

        def forward(self, x, mask_bias, past):
            a, present = self.attn(self.ln_1(x), mask_bias, past)
            x = x + a
            return x + self.mlp(self.ln_2(x)), present

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(n_pos, d)
            self.h = nn.ModuleList(Block(i) for i in range(n_layer))
            self.ln_f = nn.LayerNorm(d, eps=eps)

        def embedding_weight(self):
            return self.wte.weight

        def hidden(self, input_ids, attention_mask, position_ids, pairs):
            b, s = input_ids.shape
            past_len = pairs[0][0].shape[2] if pairs[0] is not None else 0
            if position_ids is None:
                position_ids = (torch.arange(s, device=input_ids.device) + past_len)[None, :]
            mask_bias = additive_mask(
                attention_mask_4d(attention_mask, b, s, past_len, input_ids.device)
            )
            x = self.wte(input_ids) + self.wpe(position_ids)
            presents = []
            for block, past in zip(self.h, pairs, strict=True):
                x, present = block(x, mask_bias, past)
                presents.append(present)
            return self.ln_f(x), presents

    module = causal_lm(Body(), prefix, None, options.with_past, n_layer)
    load_tensors(module, tensors, "GPT-2 checkpoint")
    dtype = next(module.parameters()).dtype
    return decoder_export_model(module, n_layer, n_head, head_dim, options.with_past, vocab, dtype)


@hookimpl
def loraformat_export_model(
    architecture: str, config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel | None:
    if architecture != ARCH:
        return None
    return _build(config, tensors, options)
