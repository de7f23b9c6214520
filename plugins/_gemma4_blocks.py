"""Gemma 4's torch blocks (imported only when an export module is built: this module imports
torch). Each class has the decoder blocks' signatures: a mixer and an MLP are built from
``(spec, dims, index)``, a layer from ``(spec, dims, index, blocks)``, and every layer sees one
:class:`Step` per forward call; Gemma 4's own settings are ``spec.gemma4`` (see
:class:`loraformat_plugins.gemma4.Gemma4`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loraformat.architecture import ExportModel, ExportOptions
from loraformat.architecture.modules import (
    Dense,
    RMSNorm,
    additive_mask,
    attend,
    attention_mask_4d,
    mask_and_positions,
)
from loraformat.architecture.protocol import CheckpointInfo
from loraformat.errors import LoraformatError

from ._common import causal_lm, decoder_export_model, encoder_activation, find_prefix, load_tensors
from ._decoder import DecoderSpec, logits_finish, rotate, torch_modules, window_allowed


@dataclass(frozen=True)
class Dims:
    vocab: int
    hidden: int
    prefix: str
    tied: bool
    activation: Callable


@dataclass
class Step:
    position_ids: Any
    attention_mask: Any
    past_len: Any
    mask_bias: dict
    tables: dict
    presents: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)


class ScalelessRMSNorm(nn.Module):
    """RMSNorm without a weight (Gemma 4's value norm)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Gemma4Attention(nn.Module):
    """Attention with per-head q/k/v norms and scale 1, this layer's own head size and KV heads;
    keys double as values in a K=V layer; a KV-shared layer has only q and o and attends over
    its source layer's present (``step.presents``), keeping no cache of its own."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        super().__init__()
        extras = spec.gemma4
        self.n_head, self.n_kv, self.head_dim = extras["layer_shapes"][index]
        self.source = extras["kv_source"][index]
        self.k_eq_v = extras["k_eq_v"][index]
        self.rope = spec.ropes[spec.rope_of[index]]
        self.rope_key = spec.rope_of[index]
        self.window = spec.windows[index]
        d, q, kv = dims.hidden, self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = Dense(d, q, bias=False)
        self.q_norm = RMSNorm(self.head_dim, spec.eps)
        if self.source is None:
            self.k_proj = Dense(d, kv, bias=False)
            if not self.k_eq_v:
                self.v_proj = Dense(d, kv, bias=False)
            self.k_norm = RMSNorm(self.head_dim, spec.eps)
            self.v_norm = ScalelessRMSNorm(spec.eps)
        self.o_proj = Dense(q, d, bias=False)

    def forward(self, x: torch.Tensor, step: Step, past: tuple | None) -> tuple[Any, tuple]:
        b, s, _ = x.shape
        tables = step.tables[self.rope_key]
        q = self.q_norm(self.q_proj(x).reshape(b, s, self.n_head, self.head_dim)).transpose(1, 2)
        q = rotate(q, step.position_ids, self.rope, *tables)
        present: tuple = ()
        if self.source is None:
            k = self.k_proj(x).reshape(b, s, self.n_kv, self.head_dim)
            v = k if self.k_eq_v else self.v_proj(x).reshape(b, s, self.n_kv, self.head_dim)
            k = rotate(self.k_norm(k).transpose(1, 2), step.position_ids, self.rope, *tables)
            v = self.v_norm(v).transpose(1, 2)
            if past is not None:
                k = torch.cat((past[0], k), dim=-2)
                v = torch.cat((past[1], v), dim=-2)
            present = (k, v)
        else:
            k, v = step.presents[self.source]
        out = attend(q, k, v, step.mask_bias[self.window], 1.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), present


class Gemma4MLP(nn.Module):
    """The gated MLP at this layer's width (double for KV-shared layers with
    ``use_double_wide_mlp``)."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        super().__init__()
        inner = spec.gemma4["intermediate"][index]
        self.act = dims.activation
        self.gate_proj = Dense(dims.hidden, inner, bias=False)
        self.up_proj = Dense(dims.hidden, inner, bias=False)
        self.down_proj = Dense(inner, dims.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma4Layer(nn.Module):
    """Gemma's sandwich-normed block, then the per-layer-input branch, then ``layer_scalar``."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int, blocks: Any = None) -> None:
        super().__init__()
        d, eps = dims.hidden, spec.eps
        self.index = index
        self.self_attn = Gemma4Attention(spec, dims, index)
        self.mlp = Gemma4MLP(spec, dims, index)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            self.add_module(name, RMSNorm(d, eps))
        self.per_layer = spec.gemma4["per_layer_input"]
        if self.per_layer:
            self.act = dims.activation
            self.per_layer_input_gate = Dense(d, self.per_layer, bias=False)
            self.per_layer_projection = Dense(self.per_layer, d, bias=False)
            self.post_per_layer_input_norm = RMSNorm(d, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_load_state_dict_post_hook(own_scalar)

    def forward(self, x: torch.Tensor, step: Step, past: tuple | None) -> tuple[Any, tuple]:
        a, present = self.self_attn(self.input_layernorm(x), step, past)
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.per_layer:
            gate = self.act(self.per_layer_input_gate(x)) * step.extras["per_layer_inputs"][
                :, :, self.index, :]
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return x * self.layer_scalar, present


def own_scalar(layer: nn.Module, incompatible: Any) -> None:
    """A loaded one-element tensor may come with stride 0 (a broadcast view of the stored
    scalar); the graph cache hashes buffers through a byte view, which needs stride 1."""
    layer.layer_scalar = layer.layer_scalar.clone(memory_format=torch.contiguous_format)


class Gemma4Body(nn.Module):
    """Scaled token embeddings, the per-layer inputs (PLE) computed once per call into
    ``step.extras``, the layers, the final norm."""

    def __init__(self, spec: DecoderSpec, dims: Dims, blocks: Any = None) -> None:
        super().__init__()
        d = dims.hidden
        self.spec = spec
        self.embed_tokens = nn.Embedding(dims.vocab, d)
        self.per_layer = spec.gemma4["per_layer_input"]
        if self.per_layer:
            total = spec.n_layer * self.per_layer
            self.embed_tokens_per_layer = nn.Embedding(1, total)  # resized when loaded
            self.per_layer_model_projection = Dense(d, total, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.per_layer, spec.eps)
        self.layers = nn.ModuleList(Gemma4Layer(spec, dims, i) for i in range(spec.n_layer))
        self.norm = RMSNorm(d, spec.eps)
        self.rope_keys = sorted(spec.ropes)
        for i, key in enumerate(self.rope_keys):
            self.register_buffer(f"inv_freq_{i}", spec.ropes[key].inv_freq.clone(),
                                 persistent=False)

    def embedding_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * torch.tensor(self.spec.embed_scale, dtype=torch.float32
                                                        ).to(self.embed_tokens.weight.dtype)
        if self.per_layer:
            b, s = input_ids.shape
            shape = (b, s, self.spec.n_layer, self.per_layer)
            scale = torch.tensor(self.per_layer**0.5).to(x.dtype)
            tokens = (self.embed_tokens_per_layer(input_ids) * scale).reshape(shape)
            projected = self.per_layer_model_projection(x) * torch.tensor(
                x.shape[-1] ** -0.5).to(x.dtype)
            projected = self.per_layer_projection_norm(projected.reshape(shape))
            step.extras["per_layer_inputs"] = (projected + tokens) * torch.tensor(2.0**-0.5).to(
                x.dtype)
        return x

    def hidden(self, input_ids, attention_mask, position_ids, pasts):
        b, s = input_ids.shape
        first = next((p for p in pasts if p), None)
        past_len = first[0].shape[2] if first is not None else 0
        attention_mask, position_ids = mask_and_positions(
            attention_mask, position_ids, b, s, past_len, input_ids.device
        )
        allowed = attention_mask_4d(attention_mask, b, s, past_len, input_ids.device)
        masks = {None: additive_mask(allowed)}
        for w in {w for w in self.spec.windows if w is not None}:
            masks[w] = additive_mask(allowed & window_allowed(s, past_len, w, input_ids.device))
        tables = {key: (getattr(self, f"inv_freq_{i}"), None)
                  for i, key in enumerate(self.rope_keys)}
        step = Step(position_ids, attention_mask, past_len, masks, tables)
        x = self.embed(input_ids, step)
        for layer, past in zip(self.layers, pasts, strict=True):
            x, present = layer(x, step, past or None)
            step.presents.append(present)
        return self.norm(x), step.presents


def build_gemma4(
    spec: DecoderSpec,
    checkpoint: CheckpointInfo,
    tensors: Mapping[str, Any],
    options: ExportOptions,
) -> ExportModel:
    """The Gemma 4 export module loaded from ``tensors``."""
    names = list(tensors)
    prefix = find_prefix(names, r"embed_tokens\.weight$")
    if prefix is None:
        raise checkpoint.error("Gemma 4 checkpoint has no embed_tokens.weight")
    embed = tensors[prefix + "embed_tokens.weight"]
    vocab, d = int(embed.shape[0]), int(embed.shape[1])
    try:
        act = encoder_activation(str(spec.activation), "Gemma 4 activation")
    except LoraformatError as e:
        raise checkpoint.config_error(e.message) from None
    tied = "lm_head.weight" not in tensors
    dims = Dims(vocab, d, prefix, tied, act)
    body = Gemma4Body(spec, dims)
    if body.per_layer:
        per_layer_vocab = int(tensors[prefix + "embed_tokens_per_layer.weight"].shape[0]) if (
            prefix + "embed_tokens_per_layer.weight" in tensors) else 1
        body.embed_tokens_per_layer = nn.Embedding(per_layer_vocab, spec.n_layer * body.per_layer)
    _, FinishedDense, TiedFinishedHead = torch_modules()
    finish = logits_finish(spec)
    if finish is None:
        lm_head = None if tied else Dense(d, vocab, bias=False)
    elif tied:
        lm_head = TiedFinishedHead(body.embed_tokens, finish)
    else:
        lm_head = FinishedDense(d, vocab, finish, bias=False)
    if options.with_past:
        raise checkpoint.error("Gemma 4: the KV-cache export waits for the per-layer caches")
    module = causal_lm(body, prefix, lm_head, options.with_past, spec.n_layer, "lm_head")
    try:
        load_tensors(module, tensors, "Gemma 4 checkpoint")
    except LoraformatError as e:
        raise checkpoint.error(e.message) from None
    dtype = next(module.parameters()).dtype
    _, n_kv, head_dim = spec.gemma4["layer_shapes"][0]
    return decoder_export_model(module, spec.n_layer, n_kv, head_dim, False, vocab, dtype)
