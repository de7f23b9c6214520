"""Qwen3.5's two token mixers as torch modules: the Gated DeltaNet linear attention
(``linear_attn``) and the gated full attention (``self_attn``).

Imports torch: the Qwen3.5 plugin imports this module only inside its ``blocks()``, so importing
the plugin does not import torch.

The gated delta rule is a recurrence over positions. It is written with torch's ``scan``
higher-order op, which torch.onnx exports as one ONNX ``Scan`` over a dynamic sequence length:
exact (each position's update as transformers' ``torch_recurrent_gated_delta_rule`` computes it,
in fp32), one graph for prefill and for single-token decode. The loop-free alternatives were
worse: the chunked WY/UT form needs ``(I+N)^-1`` of a T×T strictly lower triangular N, either a
triangular solve ONNX lacks or a product of log2(max positions) T×T matmuls whose powers of N
cancel in fp32; ONNX Runtime's ``com.microsoft`` ``LinearAttention``/``CausalConvWithState``
would need a custom translation the traced export path does not take.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraformat.architecture.modules import Dense, attend

from ._decoder import rotate, torch_modules

def l2_normalized(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ‖x‖ over the last axis, as transformers' (and FLA's) ``l2norm``."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def delta_rule_step(
    state: torch.Tensor, xs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One position of the gated delta rule: the state [b, h, dk, dv] decays by exp(g), is
    corrected towards v along k by beta, then read by q. ``xs``: q, k [b, h, dk], v [b, h, dv],
    g, beta [b, h] at this position. Pure (scan's body must be)."""
    q, k, v, g, beta = xs
    state = state * g.exp()[..., None, None]
    remembered = (state * k[..., None]).sum(dim=-2)
    delta = (v - remembered) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return state.clone(), (state * q[..., None]).sum(dim=-2)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over every position: q, k [b, s, h, dk], v [b, s, h, dv], g, beta
    [b, s, h], state [b, h, dk, dv] (all fp32) → (outputs [b, s, h, dv], final state)."""
    from torch._higher_order_ops.scan import scan

    xs = tuple(t.transpose(0, 1) for t in (q, k, v, g, beta))
    final, out = scan(delta_rule_step, state, xs)
    return out.transpose(0, 1), final


class GatedRMSNorm(nn.Module):
    """RMSNorm of each value head (``w·x``, fp32), multiplied by silu of the gate ``z``
    (transformers' ``Qwen3_5RMSNormGated``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return (h * F.silu(gate.to(torch.float32))).to(dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear attention. Its cache is (``conv_state`` [batch, conv channels,
    kernel - 1]: the last inputs of the causal depthwise convolution; ``recurrent_state``
    [batch, value heads, key head size, value head size]): both replaced on every call.

    Sizes come from ``extras`` (:data:`LINEAR_SIZES`), ``hidden`` from the checkpoint, ``eps``
    and the activation from the spec."""

    def __init__(self, extras: Mapping[str, Any], hidden: int, eps: float, activation: Any) -> None:
        super().__init__()
        self.n_k, self.n_v = int(extras["linear_num_key_heads"]), int(extras["linear_num_value_heads"])
        self.k_dim, self.v_dim = int(extras["linear_key_head_dim"]), int(extras["linear_value_head_dim"])
        self.kernel = int(extras["linear_conv_kernel_dim"])
        self.act = activation
        keys, values = self.n_k * self.k_dim, self.n_v * self.v_dim
        self.channels = 2 * keys + values
        self.in_proj_qkv = Dense(hidden, self.channels, bias=False)
        self.in_proj_z = Dense(hidden, values, bias=False)
        self.in_proj_b = Dense(hidden, self.n_v, bias=False)
        self.in_proj_a = Dense(hidden, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(
            self.channels, self.channels, self.kernel, groups=self.channels, bias=False
        )
        self.dt_bias = nn.Parameter(torch.empty(self.n_v))
        self.A_log = nn.Parameter(torch.empty(self.n_v))
        self.norm = GatedRMSNorm(self.v_dim, eps)
        self.out_proj = Dense(values, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple[Any, ...] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``mask``: this call's positions [b, s] (1 = real token; padding is zeroed, as
        transformers does), or None."""
        b, s, _ = x.shape
        if mask is not None:
            x = x * mask[:, :, None].to(x.dtype)
        if past is None:
            conv_past = x.new_zeros(b, self.channels, self.kernel - 1)
            state = torch.zeros(b, self.n_v, self.k_dim, self.v_dim, dtype=torch.float32)
        else:
            conv_past, state = past[0].to(x.dtype), past[1].to(torch.float32)
        window = torch.cat((conv_past, self.in_proj_qkv(x).transpose(1, 2)), dim=-1)
        mixed = self.act(F.conv1d(window, self.conv1d.weight, groups=self.channels))
        keys = self.n_k * self.k_dim
        q, k, v = mixed.transpose(1, 2).split((keys, keys, self.n_v * self.v_dim), dim=-1)
        q = q.reshape(b, s, self.n_k, self.k_dim).to(torch.float32)
        k = k.reshape(b, s, self.n_k, self.k_dim).to(torch.float32)
        v = v.reshape(b, s, self.n_v, self.v_dim).to(torch.float32)
        q, k = l2_normalized(q) * self.k_dim**-0.5, l2_normalized(k)
        if self.n_v != self.n_k:  # each key head serves n_v / n_k consecutive value heads
            q = q.repeat_interleave(self.n_v // self.n_k, dim=2)
            k = k.repeat_interleave(self.n_v // self.n_k, dim=2)
        beta = torch.sigmoid(self.in_proj_b(x)).to(torch.float32)
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        out, state = gated_delta_rule(q, k, v, g, beta, state)
        z = self.in_proj_z(x).reshape(b, s, self.n_v, self.v_dim)
        out = self.norm(out.to(x.dtype), z).reshape(b, s, self.n_v * self.v_dim)
        present = (window[:, :, -(self.kernel - 1) :], state.to(x.dtype))
        return self.out_proj(out), present


class GatedAttention(nn.Module):
    """Qwen3.5's full attention: ``q_proj`` gives each head's query and an output gate
    (interleaved per head), per-head q/k norms ``(1 + w)``, partial rotary, and the attention
    output multiplied by sigmoid(gate) before ``o_proj``. Its cache is key/value."""

    def __init__(
        self, hidden: int, n_head: int, n_kv: int, head_dim: int, eps: float, bias: bool
    ) -> None:
        super().__init__()
        GemmaRMSNorm = torch_modules()[0]
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim
        self.q_proj = Dense(hidden, 2 * n_head * head_dim, bias=bias)
        self.k_proj = Dense(hidden, n_kv * head_dim, bias=bias)
        self.v_proj = Dense(hidden, n_kv * head_dim, bias=bias)
        self.o_proj = Dense(n_head * head_dim, hidden, bias=bias)
        self.q_norm = GemmaRMSNorm(head_dim, eps)
        self.k_norm = GemmaRMSNorm(head_dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        mask_bias: torch.Tensor,
        position_ids: torch.Tensor,
        rope: Any,
        tables: tuple[Any, Any],
        past: tuple[Any, ...] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, s, _ = x.shape
        h, d = self.n_head, self.head_dim
        q, gate = self.q_proj(x).reshape(b, s, h, 2 * d).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).reshape(b, s, self.n_kv, d)).transpose(1, 2)
        v = self.v_proj(x).reshape(b, s, self.n_kv, d).transpose(1, 2)
        q = rotate(q, position_ids, rope, *tables)
        k = rotate(k, position_ids, rope, *tables)
        if past is not None:
            k = torch.cat((past[0], k), dim=-2)
            v = torch.cat((past[1], v), dim=-2)
        out = attend(q, k, v, mask_bias, d**-0.5).transpose(1, 2).reshape(b, s, h * d)
        out = out * torch.sigmoid(gate.reshape(b, s, h * d))
        return self.o_proj(out), (k, v)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: Any) -> None:
        super().__init__()
        self.gate_proj = Dense(hidden, inner, bias=False)
        self.up_proj = Dense(hidden, inner, bias=False)
        self.down_proj = Dense(inner, hidden, bias=False)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen3_5Layer(nn.Module):
    """A block: ``(1 + w)`` pre-norms around the mixer (``linear_attn`` or ``self_attn``, by
    the layer's kind) and the gated MLP."""

    def __init__(self, kind: str, mixer: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        GemmaRMSNorm = torch_modules()[0]
        self.kind = kind
        self.add_module("linear_attn" if kind == "linear_attention" else "self_attn", mixer)
        self.mlp = mlp
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x, mask, mask_bias, position_ids, rope, tables, past):
        h = self.input_layernorm(x)
        if self.kind == "linear_attention":
            out, present = self.linear_attn(h, mask, past)
        else:
            out, present = self.self_attn(h, mask_bias, position_ids, rope, tables, past)
        x = x + out
        return x + self.mlp(self.post_attention_layernorm(x)), present


def build_qwen3_5(
    spec: Any,
    kinds: tuple[str, ...],
    sizes: Mapping[str, int],
    checkpoint: Any,
    tensors: Mapping[str, Any],
    options: Any,
) -> Any:
    """The Qwen3.5 export module (LLaMA's inputs and outputs; with past, each linear layer's
    ``conv_state``/``recurrent_state`` and each full layer's ``key``/``value``)."""
    from loraformat.architecture import ExportModel
    from loraformat.architecture.modules import (
        additive_mask,
        attention_mask_4d,
        mask_and_positions,
    )
    from loraformat.errors import LoraformatError

    from ._common import causal_lm, encoder_activation, find_prefix, load_tensors

    GemmaRMSNorm = torch_modules()[0]
    names = list(tensors)
    prefix = find_prefix(names, r"embed_tokens\.weight$")
    if prefix is None:
        raise checkpoint.error("Qwen3.5 checkpoint has no embed_tokens.weight")
    vocab, d = (int(n) for n in tensors[prefix + "embed_tokens.weight"].shape)
    head = "lm_head"
    tied = head + ".weight" not in tensors
    inner = int(tensors[prefix + "layers.0.mlp.up_proj.weight"].shape[0])
    act = encoder_activation(str(checkpoint.config.get("hidden_act", "silu")), "Qwen3.5 activation")
    rope = spec.ropes[""]
    bias = any(n.endswith("self_attn.q_proj.bias") for n in names)

    def mixer(kind: str) -> nn.Module:
        if kind == "linear_attention":
            return GatedDeltaNet(sizes, d, spec.eps, act)
        return GatedAttention(d, spec.n_head, spec.n_kv, spec.head_dim, spec.eps, bias)

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList(
                Qwen3_5Layer(k, mixer(k), GatedMLP(d, inner, act), d, spec.eps) for k in kinds
            )
            self.norm = GemmaRMSNorm(d, spec.eps)
            self.register_buffer("inv_freq", torch.as_tensor(rope.inv_freq).clone(),
                                 persistent=False)

        def embedding_weight(self):
            return self.embed_tokens.weight

        def hidden(self, input_ids, attention_mask, position_ids, pasts):
            b, s = input_ids.shape
            with_past = pasts[0] is not None
            past_len = attention_mask.shape[1] - s if with_past else 0
            attention_mask, position_ids = mask_and_positions(
                attention_mask, position_ids, b, s, past_len, input_ids.device
            )
            mask_bias = additive_mask(
                attention_mask_4d(attention_mask, b, s, past_len, input_ids.device)
            )
            mask = attention_mask[:, -s:] if attention_mask is not None else None
            x = self.embed_tokens(input_ids)
            presents = []
            for layer, past in zip(self.layers, pasts, strict=True):
                x, present = layer(
                    x, mask, mask_bias, position_ids, rope, (self.inv_freq, None), past
                )
                presents.append(present)
            return self.norm(x), presents

    lm_head = None if tied else Dense(d, vocab, bias=False)
    module = causal_lm(Body(), prefix, lm_head, options.with_past, len(kinds), head)
    try:
        load_tensors(module, tensors, "Qwen3.5 checkpoint")
    except LoraformatError as e:
        raise checkpoint.error(e.message) from None
    dtype = next(module.parameters()).dtype
    return state_export_model(module, kinds, sizes, spec, options.with_past, vocab, dtype)


def state_export_model(module, kinds, sizes, spec, with_past, vocab, dtype):
    """Pre-merge stand-in for the public ``decoder_export_model`` with per-layer caches."""
    from loraformat.architecture import ExportModel

    from ._common import decoder_export_model, past_arg_name

    plain = decoder_export_model(module, 0, 1, 1, with_past, vocab, dtype)
    if not with_past:
        return plain
    batch, past = 2, 4
    inputs, names, outputs, axes = (
        dict(plain.example_inputs), list(plain.input_names), list(plain.output_names),
        dict(plain.dynamic_axes),
    )
    keys = sizes["linear_num_key_heads"] * sizes["linear_key_head_dim"]
    channels = 2 * keys + sizes["linear_num_value_heads"] * sizes["linear_value_head_dim"]
    for i, kind in enumerate(kinds):
        if kind == "linear_attention":
            tensors = {
                "conv_state": ((batch, channels, sizes["linear_conv_kernel_dim"] - 1), {0: "batch"}, {0: "batch"}),
                "recurrent_state": ((batch, sizes["linear_num_value_heads"], sizes["linear_key_head_dim"], sizes["linear_value_head_dim"]), {0: "batch"}, {0: "batch"}),
            }
        else:
            shape = (batch, spec.n_kv, past, spec.head_dim)
            tensors = {k: (shape, {0: "batch", 2: "past_sequence"}, {0: "batch", 2: "total_sequence"}) for k in ("key", "value")}
        for kname, (shape, pa, pr) in zip(("key", "value"), tensors.values()):
            inputs[past_arg_name(i, kname)] = torch.randn(*shape, dtype=dtype)
        for tname, (shape, pa, pr) in tensors.items():
            names.append(f"past_key_values.{i}.{tname}")
            axes[names[-1]] = pa
            outputs.append(f"present.{i}.{tname}")
            axes[outputs[-1]] = pr
    return ExportModel(module, inputs, names, outputs, axes)
