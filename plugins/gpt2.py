"""GPT-2 (Hugging Face layout): Conv1D weights stored [in, out], fused q/k/v in ``c_attn``.

Checkpoints saved by ``GPT2LMHeadModel`` prefix every tensor with ``transformer.``; the original
OpenAI hub checkpoints do not. Both are read; the LM head is tied to ``wte`` (not stored).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from loraformat.architecture import (
    SAME,
    ArchitectureBase,
    CheckpointInfo,
    DenseLayer,
    ExportModel,
    ExportOptions,
    FusedPart,
    LayerRepeat,
    ModelShape,
    NameTable,
    hookimpl,
)
from loraformat.architecture.decoder import causal_lm, decoder_export_model, kv_caches
from loraformat.architecture.plugin_tools import dense_from_shape, find_prefix, load_tensors

from ._common import model_type_is, uniform_layers

LORAFORMAT_PLUGIN_API = 2

_BLOCK = re.compile(r"^(?:.*\.)?h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")
_TOP = re.compile(r"^(?:transformer\.)?(?:wte|wpe)$")


class GPT2(ArchitectureBase):
    id = "gpt2"
    description = "GPT-2 decoder (Hugging Face layout, Conv1D weights)"
    targets = ("c_attn",)
    gguf_architecture = "gpt2"
    ort_model_type = "gpt2"
    # mlx_lm's gpt2 keeps HF names under ``model.`` (its sanitize adds it); llama.cpp stores
    # GPT-2's weights without reordering rows.
    names = NameTable(
        ("checkpoint", "peft", "gguf", "mlx"),
        [
            ("transformer.h.{bid}.attn.c_attn", SAME, "blk.{bid}.attn_qkv",
             "model.h.{bid}.attn.c_attn"),
            ("transformer.h.{bid}.attn.c_proj", SAME, "blk.{bid}.attn_output",
             "model.h.{bid}.attn.c_proj"),
            ("transformer.h.{bid}.mlp.c_fc", SAME, "blk.{bid}.ffn_up", "model.h.{bid}.mlp.c_fc"),
            ("transformer.h.{bid}.mlp.c_proj", SAME, "blk.{bid}.ffn_down",
             "model.h.{bid}.mlp.c_proj"),
            ("transformer.wte", SAME, "token_embd", "model.wte"),
            ("transformer.wpe", SAME, "position_embd", "model.wpe"),
            ("lm_head", SAME, "output", None),
        ],
        optional_prefix="transformer.",
    )

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        said = model_type_is(checkpoint.config, "gpt2", "GPT2")
        if said is not None:
            return said
        return any(_BLOCK.match(n.removesuffix(".weight")) for n in checkpoint.shapes
                   if n.endswith(".weight"))

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        shapes = checkpoint.shapes
        layers = []
        for name, shape in shapes.items():
            if not name.endswith(".weight"):
                continue
            path = name.removesuffix(".weight")
            bias = path + ".bias" if path + ".bias" in shapes else None
            if _BLOCK.match(path):
                parts: tuple[FusedPart, ...] = ()
                if path.endswith("attn.c_attn"):
                    d = int(shape[1]) // 3
                    parts = (FusedPart("q", 0, d), FusedPart("k", d, 2 * d),
                             FusedPart("v", 2 * d, 3 * d))
                layers.append(
                    dense_from_shape(path, shape, layout="in_out", parts=parts, bias=bias)
                )
            elif _TOP.match(path):
                layers.append(dense_from_shape(path, shape, layout="in_out", kind="embedding"))
            elif path == "lm_head" and checkpoint.config.get("tie_word_embeddings") is False:
                layers.append(dense_from_shape(path, shape, bias=bias))
        return layers

    def model_shape(self, checkpoint: CheckpointInfo) -> ModelShape | None:
        what = "the GPT-2 model shape"
        d = int(checkpoint.config_value("n_embd", "hidden_size", what=what))
        heads = int(checkpoint.config_value("n_head", "num_attention_heads", what=what))
        return ModelShape(
            num_layers=int(checkpoint.config_value("n_layer", "num_hidden_layers", what=what)),
            num_heads=heads, num_kv_heads=heads, head_dim=d // heads, hidden_size=d,
            vocab_size=int(checkpoint.config_value("vocab_size", default=0)),
        )

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        return _build(checkpoint, tensors, options)

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        key = "n_layer" if "n_layer" in checkpoint.config else "num_hidden_layers"
        return uniform_layers(checkpoint, r"(?:^|\.)h\.(\d+)\.", key)


@hookimpl
def loraformat_architectures() -> list[ArchitectureBase]:
    return [GPT2()]


# -- export module -------------------------------------------------------------------------------


def _build(
    checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel:
    import torch
    from torch import nn

    from loraformat.architecture.modules import (
        Dense,
        additive_mask,
        attend,
        attention_mask_4d,
        mask_and_positions,
    )

    names = list(tensors)
    prefix = find_prefix(names, r"h\.\d+\.attn\.c_attn\.weight$")
    if prefix is None:
        prefix = find_prefix(names, r"wte\.weight$") or ""
    what = "building the GPT-2 export module"
    value = checkpoint.config_value
    n_layer = int(value("n_layer", "num_hidden_layers", what=what))
    n_head = int(value("n_head", "num_attention_heads", what=what))
    d = int(tensors[prefix + "wte.weight"].shape[1])
    vocab = int(tensors[prefix + "wte.weight"].shape[0])
    n_pos = int(tensors[prefix + "wpe.weight"].shape[0])
    inner = int(tensors[prefix + "h.0.mlp.c_fc.weight"].shape[1])
    eps = float(value("layer_norm_epsilon", default=1e-5))
    head_dim = d // n_head
    act_name = value("activation_function", default="gelu_new")
    acts = {
        "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
        "gelu": nn.functional.gelu,
        "relu": nn.functional.relu,
    }
    if act_name not in acts:
        raise checkpoint.config_error(f"GPT-2 activation_function {act_name!r} is not supported")
    act = acts[act_name]
    scale_weights = bool(value("scale_attn_weights", default=True))
    by_layer = bool(value("scale_attn_by_inverse_layer_idx", default=False))

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
            attention_mask, position_ids = mask_and_positions(
                attention_mask, position_ids, b, s, past_len, input_ids.device
            )
            mask_bias = additive_mask(
                attention_mask_4d(attention_mask, b, s, past_len, input_ids.device)
            )
            x = self.wte(input_ids) + self.wpe(position_ids)
            presents = []
            for block, past in zip(self.h, pairs, strict=True):
                x, present = block(x, mask_bias, past)
                presents.append(present)
            return self.ln_f(x), presents

    caches = kv_caches(n_layer, n_head, head_dim)
    module = causal_lm(Body(), prefix, None, options.with_past, caches)
    load_tensors(module, tensors, "GPT-2 checkpoint")
    dtype = next(module.parameters()).dtype
    return decoder_export_model(module, caches, options.with_past, vocab, dtype)
