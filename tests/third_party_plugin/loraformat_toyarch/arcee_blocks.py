"""Arcee's one new building block, in torch: the MLP without a gate. Imported by
:meth:`loraformat_toyarch.arcee.Arcee.blocks` only when an export module is built."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraformat.architecture.decoder.blocks import Blocks, Dims
from loraformat.architecture.modules import Dense


class UngatedMLP(nn.Module):
    """``down(act(up(x)))``: the checkpoint's ``mlp.up_proj`` and ``mlp.down_proj``, the
    activation the config names (Arcee's ``relu2``)."""

    def __init__(self, spec: Any, dims: Dims, index: int) -> None:
        super().__init__()
        self.act = dims.activation
        self.up_proj = Dense(dims.hidden, dims.inner, bias=dims.mlp_bias)
        self.down_proj = Dense(dims.inner, dims.hidden, bias=dims.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``relu2``: ``relu(x)²``."""
    return torch.square(torch.relu(x))


ARCEE_BLOCKS = Blocks(mlp=UngatedMLP, activations={"relu2": relu_squared})
