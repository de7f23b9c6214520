"""Qwen3.5's building blocks (:mod:`loraformat.architecture.decoder.blocks`): the Gated DeltaNet
linear attention (``linear_attn``), the gated full attention (``self_attn``) and the layer that
names its mixer by kind.

Imports torch: the Qwen3.5 plugin imports this module only inside its ``blocks()``, so importing
the plugin does not import torch.

The gated delta rule is a recurrence over positions. It is written with torch's ``scan``
higher-order op, which torch.onnx exports as one ONNX ``Scan`` over a dynamic sequence length:
exact (each position's update as transformers' ``torch_recurrent_gated_delta_rule`` computes it,
in fp32), one graph for prefill and for single-token decode. The loop-free alternatives were
worse: the chunked WY/UT form needs ``(I+N)^-1`` of a T×T strictly lower triangular N, either a
triangular solve ONNX lacks or a product of log2(max positions) T×T matmuls whose powers of N
cancel in fp32. ONNX Runtime's fused ``com.microsoft`` ``LinearAttention`` (what GenAI's builder
emits) computes the same recurrence faster (tools/bench_gated_deltanet.py: 6.4x on a 256-position
prefill, 2.9x per decode step at Qwen3.5-9B's sizes), but would need a custom op translation the
traced export path does not take; the emitter could write it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraformat.architecture.decoder import LINEAR, DecoderSpec
from loraformat.architecture.decoder.blocks import Attention, DecoderLayer, Dims, Step, rotate
from loraformat.architecture.modules import Dense

from .qwen3_5 import LINEAR_SIZES


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
    """Qwen3.5's linear attention, the mixer of a ``linear_attention`` layer. Its cache is
    (``conv_state`` [batch, conv channels, kernel - 1]: the last inputs of the causal depthwise
    convolution; ``recurrent_state`` [batch, value heads, key head size, value head size]), both
    replaced on every call.

    Sizes come from ``spec.extras`` (:data:`~loraformat_plugins.qwen3_5.LINEAR_SIZES`), the
    hidden size and the activation (the config's ``hidden_act``) from ``dims``."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        super().__init__()
        sizes = {k: int(spec.extras[k]) for k in LINEAR_SIZES}
        self.n_k, self.n_v = sizes["linear_num_key_heads"], sizes["linear_num_value_heads"]
        self.k_dim, self.v_dim = sizes["linear_key_head_dim"], sizes["linear_value_head_dim"]
        self.kernel = sizes["linear_conv_kernel_dim"]
        self.act = dims.activation
        hidden, keys, values = dims.hidden, self.n_k * self.k_dim, self.n_v * self.v_dim
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
        self.norm = GatedRMSNorm(self.v_dim, spec.eps)
        self.out_proj = Dense(values, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, step: Step, past: tuple[Any, ...] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, s, _ = x.shape
        # Padded positions are zeroed before the projections, as transformers does.
        x = x * step.attention_mask[:, -s:, None].to(x.dtype)
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


class GatedAttention(Attention):
    """Qwen3.5's full attention: :class:`Attention` (per-head ``(1 + w)`` q/k norms, partial
    rotary, key/value cache) whose ``q_proj`` also gives an output gate per head (each head's
    query then its gate), the attention output multiplied by sigmoid(gate) before ``o_proj``."""

    def __init__(self, spec: DecoderSpec, dims: Dims, index: int) -> None:
        super().__init__(spec, dims, index)
        self.q_proj = Dense(dims.hidden, 2 * self.n_head * self.head_dim, bias=dims.qkv_bias)

    def forward(self, x: Any, step: Step, past: tuple[Any, ...] | None) -> tuple[Any, tuple]:
        b, s, _ = x.shape
        h, d = self.n_head, self.head_dim
        query, gate = self.q_proj(x).reshape(b, s, h, 2 * d).chunk(2, dim=-1)
        q = self.q_norm(query).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).reshape(b, s, self.n_kv, d)).transpose(1, 2)
        v = self.v_proj(x).reshape(b, s, self.n_kv, d).transpose(1, 2)
        tables = step.tables[self.rope_key]
        q = rotate(q, step.position_ids, self.rope, *tables)
        k = rotate(k, step.position_ids, self.rope, *tables)
        k, v = self.extend(k, v, past)
        out = self.attend(q, k, v, step).transpose(1, 2).reshape(b, s, h * d)
        return self.o_proj(out * torch.sigmoid(gate.reshape(b, s, h * d))), (k, v)


class Qwen3_5Layer(DecoderLayer):
    """A block whose mixer is named as the checkpoint names it: ``linear_attn`` in a linear
    layer, ``self_attn`` in a full one."""

    def mixer_name_for(self, kind: str) -> str:
        return "linear_attn" if kind == LINEAR else "self_attn"


__all__ = [
    "GatedAttention", "GatedDeltaNet", "GatedRMSNorm", "Qwen3_5Layer", "delta_rule_step",
    "gated_delta_rule", "l2_normalized",
]
