"""Torch building blocks for plugins' export modules.

:class:`Dense` stores its weight exactly as the checkpoint does (``out_in`` like nn.Linear, or
``in_out`` like GPT-2's Conv1D), so the state dict matches the checkpoint names and layout, and it
can carry a LoRA *slot*: A/B supplied at call time as graph inputs (hot-swappable export).
"""

from __future__ import annotations

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
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
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
