"""The loraformat hooks for ``toymlp`` — a complete third-party plugin in one module.

Registered by the entry point ``toymlp = "loraformat_toyarch.plugin"`` in the group
``loraformat.plugins``. Each hook answers only for ``architecture == "toymlp"`` and returns
``None`` otherwise, so the other installed plugins keep working.
"""

from __future__ import annotations

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
from loraformat.errors import LoraformatError

ARCH = "toymlp"

# Layer path ↔ llama.cpp-style GGUF name (the toy has no real GGUF loader; the names show how a
# plugin answers a convention).
_GGUF = [
    (re.compile(r"^embed$"), "token_embd"),
    (re.compile(r"^blocks\.(\d+)\.up$"), r"blk.\1.ffn_gate_up"),
    (re.compile(r"^blocks\.(\d+)\.down$"), r"blk.\1.ffn_down"),
    (re.compile(r"^head$"), "output"),
]
_GGUF_BACK = [
    (re.compile(r"^token_embd$"), "embed"),
    (re.compile(r"^blk\.(\d+)\.ffn_gate_up$"), r"blocks.\1.up"),
    (re.compile(r"^blk\.(\d+)\.ffn_down$"), r"blocks.\1.down"),
    (re.compile(r"^output$"), "head"),
]
_PATH_RE = re.compile(r"^(?:embed|head|blocks\.\d+\.(?:up|down))$")


@hookimpl
def loraformat_architectures() -> list[ArchitectureInfo]:
    return [ArchitectureInfo(ARCH, "toy gated-MLP token classifier (loraformat-toyarch)")]


@hookimpl
def loraformat_detect(config: Mapping[str, Any], tensor_names: Sequence[str]) -> str | None:
    if config.get("model_type") is not None:
        return ARCH if config["model_type"] == ARCH else None
    names = set(tensor_names)
    return ARCH if {"embed.weight", "blocks.0.up.weight", "head.weight"} <= names else None


@hookimpl
def loraformat_dense_layers(
    architecture: str, config: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> list[DenseLayer] | None:
    if architecture != ARCH:
        return None
    vocab, hidden = tensor_shapes["embed.weight"]
    layers = [DenseLayer("embed", vocab, hidden, layout="in_out", kind="embedding")]
    n = 0
    while f"blocks.{n}.up.weight" in tensor_shapes:
        up_in, up_out = tensor_shapes[f"blocks.{n}.up.weight"]  # stored [in, out]
        half = up_out // 2
        layers.append(
            DenseLayer(
                f"blocks.{n}.up", up_in, up_out, layout="in_out",
                parts=(FusedPart("gate", 0, half), FusedPart("up", half, up_out)),
                bias=f"blocks.{n}.up.bias",
            )
        )
        down_out, down_in = tensor_shapes[f"blocks.{n}.down.weight"]
        layers.append(
            DenseLayer(f"blocks.{n}.down", down_in, down_out, bias=f"blocks.{n}.down.bias")
        )
        n += 1
    labels, head_in = tensor_shapes["head.weight"]
    layers.append(DenseLayer("head", head_in, labels, bias="head.bias"))
    return layers


@hookimpl
def loraformat_default_targets(architecture: str, config: Mapping[str, Any]) -> list[str] | None:
    return ["up"] if architecture == ARCH else None


@hookimpl
def loraformat_foreign_name(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> str | None:
    if architecture != ARCH:
        return None
    if convention == "peft":  # no renaming on load: the in-memory name is the path
        return layer_path if _PATH_RE.match(layer_path) else None
    if convention == "gguf":
        for rx, name in _GGUF:
            if rx.match(layer_path):
                return rx.sub(name, layer_path)
    return None


@hookimpl
def loraformat_layer_path(
    architecture: str, config: Mapping[str, Any], foreign_name: str, convention: str
) -> str | None:
    if architecture != ARCH:
        return None
    if convention == "peft":
        return foreign_name if _PATH_RE.match(foreign_name) else None
    if convention == "gguf":
        for rx, path in _GGUF_BACK:
            if rx.match(foreign_name):
                return rx.sub(path, foreign_name)
    return None


@hookimpl
def loraformat_foreign_row_permutation(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> Sequence[int] | None:
    # The toy GGUF layout stores the fused layer as up|gate instead of gate|up.
    if architecture != ARCH or convention != "gguf":
        return None
    if not re.match(r"^blocks\.\d+\.up$", layer_path):
        return None
    if "intermediate_size" not in config:
        raise LoraformatError("config.json", "toymlp: intermediate_size is missing")
    half = int(config["intermediate_size"])
    return [*range(half, 2 * half), *range(half)]


@hookimpl
def loraformat_export_model(
    architecture: str, config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel | None:
    if architecture != ARCH:
        return None
    import torch
    from torch import nn

    from loraformat.architecture.modules import Dense

    if options.with_past:
        raise LoraformatError(None, "toymlp has no KV cache")

    def dense(path: str, layout: str = "out_in") -> Dense:
        rows, cols = tensors[path + ".weight"].shape
        in_f, out_f = (cols, rows) if layout == "out_in" else (rows, cols)
        return Dense(in_f, out_f, bias=True, layout=layout)

    class Block(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.up = dense(f"blocks.{n}.up", "in_out")
            self.down = dense(f"blocks.{n}.down")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, up = self.up(x).chunk(2, dim=-1)
            return x + self.down(nn.functional.silu(gate) * up)

    class ToyMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(*tensors["embed.weight"].shape)
            count = 0
            while f"blocks.{count}.up.weight" in tensors:
                count += 1
            self.blocks = nn.ModuleList(Block(n) for n in range(count))
            self.head = dense("head")

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    module = ToyMLP()
    module.load_state_dict({k: tensors[k] for k in module.state_dict()}, strict=True, assign=True)
    module.eval().requires_grad_(False)
    ids = torch.randint(0, tensors["embed.weight"].shape[0], (2, 5))
    axes = {0: "batch", 1: "sequence"}
    return ExportModel(
        module=module,
        example_inputs={"input_ids": ids},
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": dict(axes), "logits": dict(axes)},
    )
