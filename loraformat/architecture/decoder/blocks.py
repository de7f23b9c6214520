"""The torch building blocks of a described decoder's export module, one class per piece, and
:func:`build`, which puts a family's together.

A family configures the pieces through its :class:`~.spec.DecoderSpec` and replaces one at a
time through :class:`Blocks` (its :meth:`~.family.DecoderFamily.blocks`): a mixer per layer kind
(attention, a linear attention), the MLP, the layer, the body. Each piece is built from
``(spec, dims, index)`` and its submodules carry the checkpoint's names, so the module's state
dict equals the checkpoint's tensors.

Every forward is traceable by torch.onnx: windows, rope choices and soft-caps are fixed by the
spec; the only data-dependent choice (LongRoPE's frequency switch) is a ``torch.where``.

This module imports torch; plugins import it only where they build a module.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loraformat.architecture.layers import ExportModel, ExportOptions
from loraformat.architecture.modules import (
    Dense,
    RMSNorm,
    additive_mask,
    apply_rotary,
    attend,
    attention_mask_4d,
    mask_and_positions,
)
from loraformat.architecture.plugin_tools import activation_function, find_prefix, load_tensors
from loraformat.architecture.protocol import CheckpointInfo
from loraformat.errors import LoraformatError

from .causal_lm import causal_lm, decoder_export_model
from .config import head_path
from .rope import Rope
from .spec import FULL, PAST, SLIDING, DecoderSpec, LayerCache

# -- what the pieces are built from and see -------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Sizes and presences :func:`build` reads off the checkpoint's tensors (the spec has the
    config's): vocabulary, hidden and MLP sizes, where the decoder sits, which projections have
    biases, whether the head is tied, the MLP's activation function, the head's path."""

    vocab: int
    hidden: int
    inner: int
    prefix: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied: bool
    activation: Callable[[Any], Any]
    head: str


@dataclass
class Step:
    """What every layer sees in one forward call.

    ``position_ids`` [b, s]; ``attention_mask`` [b, past + s] (1 at a real token; a linear
    attention zeroes padded inputs with it); ``past_len`` the cached positions before the call;
    ``mask_bias`` the additive attention mask [b, 1, s, past + s] per window (None: full
    attention); ``tables`` the rope buffers per rope key; ``presents`` the presents of the layers
    already run (a layer that shares another's keys and values reads them there); ``extras`` what
    a family's body computes once for its layers (per-layer inputs)."""

    position_ids: Any
    attention_mask: Any
    past_len: Any
    mask_bias: dict[int | None, Any]
    tables: dict[str, tuple[Any, Any]]
    presents: list[tuple[Any, ...]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


# -- small pieces ---------------------------------------------------------------------------------


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) · (1 + w)``, all in fp32, then cast back (the checkpoint
    stores w around 0)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.to(torch.float32))).to(x.dtype)


def rms_norm(spec: DecoderSpec, dim: int) -> nn.Module:
    """The family's RMSNorm over ``dim`` channels: LLaMA's ``w·x`` or Gemma's ``(1 + w)·x``."""
    return GemmaRMSNorm(dim, spec.eps) if spec.gemma_norm else RMSNorm(dim, spec.eps)


class Rotary(nn.Module):
    """The rope tables of every rope key, as buffers that are not persistent: derived from the
    config, not checkpoint tensors."""

    def __init__(self, ropes: Mapping[str, Rope]) -> None:
        super().__init__()
        self.keys = sorted(ropes)
        for i, key in enumerate(self.keys):
            rope = ropes[key]
            self.register_buffer(f"inv_freq_{i}", torch.tensor(rope.inv_freq), persistent=False)
            if rope.long_inv_freq is not None:
                long = torch.tensor(rope.long_inv_freq)
                self.register_buffer(f"long_inv_freq_{i}", long, persistent=False)

    def tables(self) -> dict[str, tuple[Any, Any]]:
        """Per rope key, (inverse frequencies, LongRoPE's long ones or None)."""
        return {
            key: (getattr(self, f"inv_freq_{i}"), getattr(self, f"long_inv_freq_{i}", None))
            for i, key in enumerate(self.keys)
        }


def rotate(x: Any, position_ids: Any, rope: Rope, inv_freq: Any, long_inv_freq: Any) -> Any:
    """Rotary embedding of x [b, h, s, d] (HF's half-split layout) over its first ``rope.dim``
    channels; the rest pass through (partial rotary)."""
    if rope.dim == 0:
        return x
    if long_inv_freq is not None:
        # LongRoPE picks one frequency set for the whole call from the highest position, like
        # transformers' longrope_frequency_update: a where, not a branch, so it stays traceable.
        longer = position_ids.max() + 1 > rope.threshold
        inv_freq = torch.where(longer, long_inv_freq, inv_freq)
    if rope.dim == x.shape[-1]:
        return apply_rotary(x, position_ids, inv_freq, rope.scaling)
    rotated = apply_rotary(x[..., : rope.dim], position_ids, inv_freq, rope.scaling)
    return torch.cat((rotated, x[..., rope.dim :]), dim=-1)


def window_allowed(seq: int, past: Any, window: int, device: Any) -> Any:
    """[1, 1, seq, past+seq]: True where key j is within ``window`` of query i (absolute
    position ``past + i``): ``j > past + i - window``, as transformers' sliding-window overlay."""
    q_pos = torch.arange(seq, device=device) + past
    k_pos = torch.arange(seq + past, device=device)
    return (k_pos[None, :] > q_pos[:, None] - window)[None, None, :, :]


def softcapped_attend(q: Any, k: Any, v: Any, mask_bias: Any, scale: float, cap: float) -> Any:
    """:func:`attend` with Gemma 2's score soft-cap ``cap·tanh(s/cap)`` before the mask."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    probs = torch.softmax(scores + mask_bias, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


# -- the mixers, the MLP, the layer, the body -----------------------------------------------------


class Attention(nn.Module):
    """Softmax attention with GQA, optional biases, q/k norms, rotary, a sliding window, a
    score soft-cap and a query temperature, as the spec says for layer ``index``.

    Pieces a family may replace one by one in a subclass: :meth:`project` (q/k/v before the
    head split), :meth:`queries_keys_values` (heads, norms, rotary), :meth:`attend`; one that
    writes its own ``forward`` appends to the cache with :meth:`extend`."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        super().__init__()
        self.spec, self.index = spec, index
        self.n_head, self.n_kv, self.head_dim = spec.shape_of_layer(index)
        self.rope_key, self.window = spec.rope_of[index], spec.windows[index]
        self.rope = spec.ropes[self.rope_key]
        self.scale = spec.attn_scale if spec.attn_scale is not None else self.head_dim**-0.5
        d, q, kv = dims.hidden, self.n_head * self.head_dim, self.n_kv * self.head_dim
        if spec.fused_qkv:
            self.qkv_proj = Dense(d, q + 2 * kv, bias=dims.qkv_bias)
        else:
            self.q_proj = Dense(d, q, bias=dims.qkv_bias)
            self.k_proj = Dense(d, kv, bias=dims.qkv_bias)
            self.v_proj = Dense(d, kv, bias=dims.qkv_bias)
        self.o_proj = Dense(q, d, bias=dims.o_bias)
        if spec.qk_norm:
            whole = spec.qk_norm_span == "projection"
            self.q_norm = rms_norm(spec, q if whole else self.head_dim)
            self.k_norm = rms_norm(spec, kv if whole else self.head_dim)

    def project(self, x: Any) -> tuple[Any, Any, Any]:
        """q, k, v [b, s, heads·head_dim] from the layer's input."""
        if self.spec.fused_qkv:
            kv = self.n_kv * self.head_dim
            return self.qkv_proj(x).split((self.n_head * self.head_dim, kv, kv), dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def queries_keys_values(self, x: Any, step: Step) -> tuple[Any, Any, Any]:
        """q [b, h, s, d], k and v [b, kv_h, s, d]: projected, normed, rotated, scaled."""
        spec = self.spec
        b, s, _ = x.shape
        q, k, v = self.project(x)
        if spec.qk_norm and spec.qk_norm_span == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, s, self.n_head, self.head_dim)
        k = k.reshape(b, s, self.n_kv, self.head_dim)
        if spec.qk_norm and spec.qk_norm_span == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        tables = step.tables[self.rope_key]
        q = rotate(q, step.position_ids, self.rope, *tables)
        k = rotate(k, step.position_ids, self.rope, *tables)
        if spec.query_scale is not None:
            q = q * spec.query_scale(step.position_ids).to(q.dtype)
        return q, k, v

    def attend(self, q: Any, k: Any, v: Any, step: Step) -> Any:
        """The attention output [b, h, s, d] of q over the whole k/v (past included)."""
        mask_bias = step.mask_bias[self.window]
        if self.spec.attn_softcap is None:
            return attend(q, k, v, mask_bias, self.scale)
        return softcapped_attend(q, k, v, mask_bias, self.scale, self.spec.attn_softcap)

    @staticmethod
    def extend(k: Any, v: Any, past: tuple[Any, ...] | None) -> tuple[Any, Any]:
        """This call's keys and values [b, kv_h, s, d] after the cached ones (the present)."""
        if past is None:
            return k, v
        return torch.cat((past[0], k), dim=-2), torch.cat((past[1], v), dim=-2)

    def forward(self, x: Any, step: Step, past: tuple[Any, ...] | None) -> tuple[Any, tuple]:
        b, s, _ = x.shape
        q, k, v = self.queries_keys_values(x, step)
        k, v = self.extend(k, v, past)
        out = self.attend(q, k, v, step)
        out = out.transpose(1, 2).reshape(b, s, self.n_head * self.head_dim)
        return self.o_proj(out), (k, v)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) · up(x))``, gate and up fused or split."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        super().__init__()
        self.fused, self.act = spec.fused_gate_up, dims.activation
        d, inner = dims.hidden, dims.inner
        if self.fused:
            self.gate_up_proj = Dense(d, 2 * inner, bias=dims.mlp_bias)
        else:
            self.gate_proj = Dense(d, inner, bias=dims.mlp_bias)
            self.up_proj = Dense(d, inner, bias=dims.mlp_bias)
        self.down_proj = Dense(inner, d, bias=dims.mlp_bias)

    def forward(self, x: Any) -> Any:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """One block: its mixer (by the layer's kind), its MLP, the norms the spec places."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int, blocks: Blocks) -> None:
        super().__init__()
        self.spec, self.index = spec, index
        kind = spec.kind_of(index)
        if kind not in blocks.mixers:
            raise LoraformatError(
                None, f"{spec.family}: layer {index} is {kind!r}, which no block builds "
                f"(blocks for: {', '.join(sorted(blocks.mixers))})"
            )
        self.mixer_name = self.mixer_name_for(kind)
        self.add_module(self.mixer_name, blocks.mixers[kind](spec, dims, index))
        self.mlp = blocks.mlp(spec, dims, index)
        self.norm_names = spec.norms()
        for name in self.norm_names:
            if name is not None:
                self.add_module(name, rms_norm(spec, dims.hidden))

    def mixer_name_for(self, kind: str) -> str:
        """The checkpoint's name of a mixer of ``kind`` (``self_attn``)."""
        return "self_attn"

    def normed(self, place: int, x: Any) -> Any:
        name = self.norm_names[place]
        return x if name is None else getattr(self, name)(x)

    def residual(self, x: Any, out: Any) -> Any:
        scale = self.spec.residual_scale
        return x + (out if scale is None else out * scale)

    def forward(self, x: Any, step: Step, past: tuple[Any, ...] | None) -> tuple[Any, tuple]:
        mixer = getattr(self, self.mixer_name)
        a, present = mixer(self.normed(0, x), step, past)
        x = self.residual(x, self.normed(1, a))
        m = self.normed(3, self.mlp(self.normed(2, x)))
        return self.residual(x, m), present


class DecoderBody(nn.Module):
    """Embedding, layers, final norm and rope tables; :meth:`hidden` runs them for one call.
    A family replaces :meth:`embed` for its own embeddings (per-layer inputs)."""

    def __init__(self, spec: DecoderSpec, dims: Dims, blocks: Blocks) -> None:
        super().__init__()
        self.spec, self.dims = spec, dims
        self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden)
        self.layers = nn.ModuleList(
            blocks.layer(spec, dims, i, blocks) for i in range(spec.n_layer)
        )
        self.norm = rms_norm(spec, dims.hidden)
        self.rotary_emb = Rotary(spec.ropes)
        self.caches = spec.layer_caches()
        self.windows = sorted({w for w in spec.windows if w is not None})

    def embedding_weight(self) -> Any:
        return self.embed_tokens.weight

    def embed(self, input_ids: Any, step: Step) -> Any:
        """The first layer's input: the token embeddings, scaled where the spec says."""
        x = self.embed_tokens(input_ids)
        if self.spec.embed_scale is not None:
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        return x

    def past_length(self, input_ids: Any, attention_mask: Any, pasts: Sequence[Any]) -> Any:
        """The cached positions before this call: a growing cache's ``past`` axis, else the
        mask's length beyond the new tokens, else 0."""
        for cache, past in zip(self.caches, pasts, strict=True):
            for j, tensor in enumerate(cache.tensors):
                if tensor.grows and past is not None:
                    return past[j].shape[tensor.dims.index(PAST)]
        if attention_mask is not None and any(p is not None for p in pasts):
            return attention_mask.shape[1] - input_ids.shape[1]
        return 0

    def step(self, input_ids: Any, attention_mask: Any, position_ids: Any, pasts: Sequence[Any]
             ) -> Step:
        b, s = input_ids.shape
        past_len = self.past_length(input_ids, attention_mask, pasts)
        attention_mask, position_ids = mask_and_positions(
            attention_mask, position_ids, b, s, past_len, input_ids.device
        )
        allowed = attention_mask_4d(attention_mask, b, s, past_len, input_ids.device)
        # One additive mask per distinct window, built once per forward.
        masks = {None: additive_mask(allowed)}
        for w in self.windows:
            masks[w] = additive_mask(allowed & window_allowed(s, past_len, w, input_ids.device))
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + s, dtype=torch.int64)
        return Step(position_ids, attention_mask, past_len, masks, self.rotary_emb.tables())

    def hidden(self, input_ids: Any, attention_mask: Any, position_ids: Any,
               pasts: Sequence[Any]) -> tuple[Any, list[tuple]]:
        step = self.step(input_ids, attention_mask, position_ids, pasts)
        x = self.embed(input_ids, step)
        for layer, past in zip(self.layers, pasts, strict=True):
            x, present = layer(x, step, past)
            step.presents.append(present)
        return self.norm(x), step.presents


@dataclass(frozen=True)
class Blocks:
    """The classes :func:`build` makes a module of: a mixer per layer kind, the MLP, the layer,
    the body. A family replaces any of them (``Blocks(mixers={**DEFAULT_MIXERS, "linear_attention":
    MyMixer})``)."""

    mixers: Mapping[str, type] = field(
        default_factory=lambda: {FULL: Attention, SLIDING: Attention}
    )
    mlp: type = GatedMLP
    layer: type = DecoderLayer
    body: type = DecoderBody
    #: Activations by a config's ``hidden_act`` name beyond those loraformat knows
    #: (:func:`~loraformat.architecture.plugin_tools.activation_function`).
    activations: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)


# -- the head -------------------------------------------------------------------------------------


class FinishedDense(Dense):
    """An untied ``lm_head`` whose logits pass through ``finish`` (a soft-cap, a divisor).
    Still a :class:`Dense`, so it can carry a LoRA slot."""

    def __init__(self, d: int, vocab: int, finish: Callable, bias: bool = False) -> None:
        super().__init__(d, vocab, bias=bias)
        self.finish = finish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(super().forward(x))


class TiedFinishedHead(nn.Module):
    """Logits from the embedding table, passed through ``finish``. The embedding is held
    without being registered, so the state dict has no ``lm_head`` key (the checkpoint has
    none)."""

    def __init__(self, embedding: nn.Module, finish: Callable) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)
        self.finish = finish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x @ self.embedding.weight.t())


def logits_finish(spec: DecoderSpec) -> Callable[[Any], Any] | None:
    """What the logits pass through after the head: Granite's divisor, then Gemma's soft-cap;
    None when neither."""
    if spec.logits_divisor is None and spec.final_softcap is None:
        return None
    return functools.partial(_finish_logits, spec.logits_divisor, spec.final_softcap)


def _finish_logits(divisor: float | None, cap: float | None, logits: Any) -> Any:
    if divisor is not None:
        logits = logits / divisor
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


# -- putting it together --------------------------------------------------------------------------


def _any_layer(names: Sequence[str], prefix: str, suffix: str) -> str | None:
    """The first ``<prefix>layers.N.<suffix>`` among ``names``."""
    rx = re.compile(re.escape(prefix) + r"layers\.\d+\." + re.escape(suffix) + "$")
    return next((n for n in names if rx.match(n)), None)


def read_dims(
    spec: DecoderSpec, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], blocks: Blocks
) -> Dims:
    """The :class:`Dims` of ``spec``'s module over ``tensors`` (state-dict keys = checkpoint
    names). Biases and the MLP size are read from whichever layer has the projection (a layer
    of another kind may not); the activation from ``blocks.activations``, else loraformat's."""
    names = list(tensors)
    family = spec.family
    # The embedding first: a multimodal checkpoint's vision tower has layers.N. blocks too.
    prefix = find_prefix(names, r"embed_tokens\.weight$")
    prefix = prefix if prefix is not None else (find_prefix(names, r"layers\.\d+\.") or "")
    if prefix + "embed_tokens.weight" not in tensors:
        raise checkpoint.error(f"{family} checkpoint has no {prefix}embed_tokens.weight")
    embed = tensors[prefix + "embed_tokens.weight"]
    up_name = "mlp.gate_up_proj.weight" if spec.fused_gate_up else "mlp.up_proj.weight"
    up = _any_layer(names, prefix, up_name)
    if up is None:
        raise checkpoint.error(f"{family} checkpoint has no {prefix}layers.N.{up_name}")
    inner = int(tensors[up].shape[0]) // (2 if spec.fused_gate_up else 1)
    first_attn = "self_attn.qkv_proj" if spec.fused_qkv else "self_attn.q_proj"
    act_name = str(checkpoint.config_value("hidden_activation", "hidden_act", default="silu"))
    try:
        act = blocks.activations.get(act_name) or activation_function(
            act_name, f"{family} activation"
        )
    except LoraformatError as e:
        raise checkpoint.config_error(e.message) from None
    head = head_path(prefix)
    tied = head + ".weight" not in tensors
    if tied and checkpoint.config.get("tie_word_embeddings") is False:
        raise checkpoint.error(
            f"{family} checkpoint has no {head}.weight and tie_word_embeddings is false"
        )
    return Dims(
        vocab=int(embed.shape[0]),
        hidden=int(embed.shape[1]),
        inner=inner,
        prefix=prefix,
        qkv_bias=_any_layer(names, prefix, first_attn + ".bias") is not None,
        o_bias=_any_layer(names, prefix, "self_attn.o_proj.bias") is not None,
        mlp_bias=_any_layer(names, prefix, "mlp.down_proj.bias") is not None,
        tied=tied,
        activation=act,
        head=head,
    )


def build(
    spec: DecoderSpec,
    checkpoint: CheckpointInfo,
    tensors: Mapping[str, Any],
    options: ExportOptions,
    blocks: Blocks | None = None,
) -> ExportModel:
    """The export module ``blocks`` (default :class:`Blocks`) make of ``spec``, loaded from
    ``tensors`` (state-dict keys = checkpoint names), with every decoder's inputs and outputs
    (:func:`~.causal_lm.decoder_export_model`; ``options.with_past`` adds each layer's cache)."""
    blocks = blocks if blocks is not None else Blocks()
    if checkpoint.config.get("use_bidirectional_attention"):
        raise checkpoint.config_error(f"{spec.family}: bidirectional attention cannot be exported")
    dims = read_dims(spec, checkpoint, tensors, blocks)
    body = blocks.body(spec, dims, blocks)
    finish = logits_finish(spec)
    head_bias = dims.head + ".bias" in tensors
    if finish is None:
        lm_head = None if dims.tied else Dense(dims.hidden, dims.vocab, bias=head_bias)
    elif dims.tied:
        lm_head = TiedFinishedHead(body.embed_tokens, finish)
    else:
        lm_head = FinishedDense(dims.hidden, dims.vocab, finish, bias=head_bias)
    caches: tuple[LayerCache, ...] = spec.layer_caches()
    module = causal_lm(body, dims.prefix, lm_head, options.with_past, caches, dims.head)
    try:
        load_tensors(module, tensors, f"{spec.family} checkpoint")
    except LoraformatError as e:
        raise checkpoint.error(e.message) from None  # name the checkpoint file
    dtype = next(module.parameters()).dtype
    return decoder_export_model(module, caches, options.with_past, dims.vocab, dtype)


__all__ = [
    "Attention",
    "Blocks",
    "DecoderBody",
    "DecoderLayer",
    "Dims",
    "FinishedDense",
    "GatedMLP",
    "GemmaRMSNorm",
    "Rotary",
    "Step",
    "TiedFinishedHead",
    "build",
    "logits_finish",
    "read_dims",
    "rms_norm",
    "rotate",
    "softcapped_attend",
    "window_allowed",
]
