"""Torch building blocks for plugins' export modules.

:class:`Dense` stores its weight exactly as the checkpoint does (``out_in`` like nn.Linear, or
``in_out`` like GPT-2's Conv1D), so the state dict matches the checkpoint names and layout, and it
can carry a LoRA *slot*: A/B supplied at call time as graph inputs (hot-swappable export).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Dense(nn.Module):
    """y = x·Wᵀ + b (``out_in``) or x·W + b (``in_out``), plus (x·A)·B when a slot is filled.

    Slot tensors use ONNX Runtime's multi-LoRA convention: A is [in, r], B is [r, out], the scaling
    already folded into B. They are set on ``lora_A``/``lora_B`` by the exporter for the duration of
    one forward call.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, layout: str = "out_in"
    ) -> None:
        super().__init__()
        if layout not in ("out_in", "in_out"):
            raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        shape = (out_features, in_features) if layout == "out_in" else (in_features, out_features)
        # Uninitialised: the checkpoint's tensors are always loaded over them (and an export
        # builds on placeholders, where zero-filling every weight cost 1.8 s at 0.49B).
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "out_in":
            y = nn.functional.linear(x, self.weight, self.bias)
        else:
            y = x @ self.weight
            if self.bias is not None:
                y = y + self.bias
        if self.lora_A is not None and self.lora_B is not None:
            y = y + (x @ self.lora_A) @ self.lora_B
        return y


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: computed in fp32, scaled by ``weight`` in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class EncoderSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention, as in BERT and ViT: h [b, s, hidden] → the heads'
    outputs concatenated [b, s, hidden], before the output projection.

    The projections are children named ``query``/``key``/``value`` (the encoders' checkpoint names),
    so state-dict keys equal checkpoint names. ``mask`` is a boolean [b, 1, 1, keys], True where a
    key may be attended, or None. Scores and softmax run in fp32 (as transformers' softmax does),
    so an fp16 export cannot overflow; masked keys are replaced by the fp32 minimum, not added to.
    """

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module, heads: int) -> None:
        super().__init__()
        self.query, self.key, self.value = query, key, value
        self.heads = heads

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = h.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, s, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)


def mask_and_positions(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch: int,
    seq: int,
    past: int | torch.SymInt,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The [batch, past+seq] attention mask and the [batch, seq] position ids a decoder uses.

    A mask of shape [1, 1] (the plain export's default input, ones) is broadcast to every row.
    Without ``position_ids``, a given mask decides them: each row counts only its own tokens, so
    a padded row's tokens sit where the unpadded row's do (transformers' rule when it generates
    from a padded batch: cumulative sum of the mask, minus one); without a mask they are
    ``past .. past+seq-1``.
    """
    if attention_mask is not None:
        attention_mask = attention_mask.expand(batch, seq + past)
    if position_ids is None:
        if attention_mask is not None:
            counted = attention_mask.to(torch.int64).cumsum(-1) - 1
            position_ids = counted.clamp(min=0)[:, past:]
        else:
            position_ids = (torch.arange(seq, device=device) + past)[None, :].expand(batch, seq)
    return attention_mask, position_ids


def attention_mask_4d(
    attention_mask: torch.Tensor | None,
    batch: int,
    seq: int,
    past: int | torch.SymInt,
    device: torch.device,
) -> torch.Tensor:
    """A boolean [batch, 1, seq, past+seq] mask: True where a query may attend a key.

    Queries sit at absolute positions ``past .. past+seq-1``; key ``j`` is visible to query ``i``
    when ``j <= past + i`` and ``attention_mask[:, j]`` is non-zero (``attention_mask`` is
    [batch, past+seq] of 0/1, or ``None`` for all ones). Written with tensor ops only, so sizes
    stay symbolic in an export.
    """
    q_pos = torch.arange(seq, device=device) + past
    k_pos = torch.arange(seq + past, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None, :, :]
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] != 0)
    else:
        allowed = allowed.expand(batch, 1, seq, seq + past)
    return allowed


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """The fp32 bias form of a boolean mask: 0 where allowed, the most negative float elsewhere.

    Computed once per forward and *added* to the scores: ONNX Runtime's attention fusions match
    ``Softmax(MatMul(Q, Kᵀ)·scale + mask)``, not a ``Where`` after the scale.
    """
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(torch.float32).min)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of q [b, h, s, d] over k/v [b, kv_h, t, d] (kv heads repeated for GQA).

    ``mask_bias`` is an :func:`additive_mask`, built once per forward. Explicit matmul/softmax
    (not SDPA) so the exported graph is plain; scores and softmax are fp32, so the additive mask
    cannot overflow an fp16 model.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * scale
    probs = torch.softmax(scores + mask_bias, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> torch.Tensor:
    """Rotary embedding (HF's half-split layout) of x [b, h, s, d] at ``position_ids`` [b, s]."""
    freqs = position_ids[:, :, None].to(torch.float32) * inv_freq.to(torch.float32)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_scaling)[:, None, :, :].to(x.dtype)
    sin = (emb.sin() * attention_scaling)[:, None, :, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin
