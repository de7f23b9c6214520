"""Gemma 4's torch blocks, replacing the decoder's attention, MLP, layer and body (imported only
when an export module is built: this module imports torch). Gemma 4's own settings are the
spec's ``extras`` (see :class:`loraformat_plugins.gemma4.Gemma4`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from loraformat.architecture.decoder import FULL, SLIDING, DecoderSpec
from loraformat.architecture.decoder.blocks import (
    Attention,
    Blocks,
    DecoderBody,
    DecoderLayer,
    Dims,
    GatedMLP,
    Step,
    rotate,
)
from loraformat.architecture.modules import Dense, RMSNorm


class ScalelessRMSNorm(RMSNorm):
    """RMSNorm without a stored weight (Gemma 4's value norm): its weight is a buffer of ones
    outside the state dict, so the graph has an RMSNorm's shape, which ONNX Runtime's fusions
    turn into SimplifiedLayerNormalization (a weightless one sends its optimizer astray)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        del self.weight
        self.register_buffer("weight", torch.ones(dim), persistent=False)


class Gemma4Attention(Attention):
    """Attention with per-head q/k norms, a weightless v norm and scale 1 (the spec's), at the
    layer's own head size and KV heads. In a K=V layer the values are the key projection's
    output, normed but not rotated; a KV-shared layer has only q and o and attends over its
    source layer's present (``step.presents``), keeping no cache of its own."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        super().__init__(spec, dims, index)
        self.source = spec.extras["kv_source"][index]
        self.k_eq_v = spec.extras["k_eq_v"][index]
        if self.source is not None:
            del self.k_proj, self.v_proj, self.k_norm
        else:
            if self.k_eq_v:
                del self.v_proj
            self.v_norm = ScalelessRMSNorm(self.head_dim, spec.eps)

    def forward(self, x: Any, step: Step, past: tuple[Any, ...] | None) -> tuple[Any, tuple]:
        b, s, _ = x.shape
        tables = step.tables[self.rope_key]
        q = self.q_norm(self.q_proj(x).reshape(b, s, self.n_head, self.head_dim))
        q = rotate(q.transpose(1, 2), step.position_ids, self.rope, *tables)
        present: tuple = ()
        if self.source is not None:
            k, v = step.presents[self.source]
        else:
            k = self.k_proj(x).reshape(b, s, self.n_kv, self.head_dim)
            v = k if self.k_eq_v else self.v_proj(x).reshape(b, s, self.n_kv, self.head_dim)
            k = rotate(self.k_norm(k).transpose(1, 2), step.position_ids, self.rope, *tables)
            v = self.v_norm(v).transpose(1, 2)
            k, v = self.extend(k, v, past)
            present = (k, v)
        out = self.attend(q, k, v, step).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), present


class Gemma4MLP(GatedMLP):
    """The gated MLP at the layer's own width (double for KV-shared layers with
    ``use_double_wide_mlp``)."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        inner = spec.extras["intermediate"][index]
        super().__init__(spec, dataclasses.replace(dims, inner=inner), index)


def own_scalar(layer: nn.Module, incompatible: Any) -> None:
    """A loaded one-element tensor may come with stride 0 (a broadcast view of the stored
    scalar); the graph cache hashes buffers through a byte view, which needs stride 1."""
    layer.layer_scalar = layer.layer_scalar.clone(memory_format=torch.contiguous_format)


class Gemma4Layer(DecoderLayer):
    """Gemma's sandwich-normed block, then the per-layer-input branch
    (``post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(x)) · input))``
    added to the residual), then the whole output times ``layer_scalar``."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int, blocks: Blocks) -> None:
        super().__init__(spec, dims, index, blocks)
        self.per_layer = spec.extras["per_layer_input"]
        if self.per_layer:
            self.act = dims.activation
            self.per_layer_input_gate = Dense(dims.hidden, self.per_layer, bias=False)
            self.per_layer_projection = Dense(self.per_layer, dims.hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(dims.hidden, spec.eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_load_state_dict_post_hook(own_scalar)

    def forward(self, x: Any, step: Step, past: tuple[Any, ...] | None) -> tuple[Any, tuple]:
        x, present = super().forward(x, step, past)
        if self.per_layer:
            given = step.extras["per_layer_inputs"][:, :, self.index, :]
            gate = self.act(self.per_layer_input_gate(x)) * given
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return x * self.layer_scalar, present


class Gemma4Body(DecoderBody):
    """The decoder body with the per-layer inputs (PLE): a second embedding table
    (``embed_tokens_per_layer``, scaled by √width) plus the normed projection of the scaled
    token embeddings (``per_layer_model_projection`` / √hidden), averaged (·1/√2) and split per
    layer, computed once per call into ``step.extras``."""

    def __init__(self, spec: DecoderSpec, dims: Dims, blocks: Blocks) -> None:
        super().__init__(spec, dims, blocks)
        self.per_layer = spec.extras["per_layer_input"]
        if self.per_layer:
            total = spec.n_layer * self.per_layer
            self.embed_tokens_per_layer = nn.Embedding(spec.extras["per_layer_vocab"], total)
            self.per_layer_model_projection = Dense(dims.hidden, total, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.per_layer, spec.eps)

    def embed(self, input_ids: Any, step: Step) -> Any:
        x = super().embed(input_ids, step)
        if self.per_layer:
            b, s = input_ids.shape
            shape = (b, s, self.spec.n_layer, self.per_layer)
            tokens = self.embed_tokens_per_layer(input_ids) * torch.tensor(
                self.per_layer**0.5, dtype=x.dtype)
            projected = self.per_layer_model_projection(x) * torch.tensor(
                self.dims.hidden**-0.5, dtype=x.dtype)
            projected = self.per_layer_projection_norm(projected.reshape(shape))
            step.extras["per_layer_inputs"] = (projected + tokens.reshape(shape)) * torch.tensor(
                2.0**-0.5, dtype=x.dtype)
        return x


def gemma4_blocks() -> Blocks:
    """Gemma 4's replacements of the decoder blocks."""
    return Blocks(
        mixers={FULL: Gemma4Attention, SLIDING: Gemma4Attention},
        mlp=Gemma4MLP,
        layer=Gemma4Layer,
        body=Gemma4Body,
    )
