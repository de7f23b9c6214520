"""The loraformat plugin for ``toymlp`` — a complete third-party plugin in one module.

Registered by the entry point ``toymlp = "loraformat_toyarch.plugin"`` in the group
``loraformat.plugins``. The module declares the plugin API it was written for and answers the one
hook, ``loraformat_architectures``, with an architecture object; loraformat detects a checkpoint's
architecture once and then asks that object directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loraformat.architecture import (
    SAME,
    ArchitectureBase,
    CheckpointInfo,
    DenseLayer,
    ExportModel,
    ExportOptions,
    FusedPart,
    NameTable,
    hookimpl,
)

LORAFORMAT_PLUGIN_API = 2


class ToyMLP(ArchitectureBase):
    id = "toymlp"
    description = "toy gated-MLP token classifier (loraformat-toyarch)"
    targets = ("up",)
    # Checkpoint layer path ↔ each convention's name, one row per layer kind. PEFT's names are the
    # paths (no renaming on load); the toy has no real GGUF loader, the column shows how a plugin
    # answers a convention. Both directions come from this one table.
    names = NameTable(
        ("checkpoint", "peft", "gguf"),
        [
            ("embed", SAME, "token_embd"),
            ("blocks.{bid}.up", SAME, "blk.{bid}.ffn_gate_up"),
            ("blocks.{bid}.down", SAME, "blk.{bid}.ffn_down"),
            ("head", SAME, "output"),
        ],
    )

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        if checkpoint.config.get("model_type") is not None:
            return bool(checkpoint.config["model_type"] == self.id)
        return {"embed.weight", "blocks.0.up.weight", "head.weight"} <= set(checkpoint.shapes)

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        shapes = checkpoint.shapes
        vocab, hidden = shapes["embed.weight"]
        layers = [DenseLayer("embed", vocab, hidden, layout="in_out", kind="embedding")]
        n = 0
        while f"blocks.{n}.up.weight" in shapes:
            up_in, up_out = shapes[f"blocks.{n}.up.weight"]  # stored [in, out]
            half = up_out // 2
            layers.append(
                DenseLayer(
                    f"blocks.{n}.up", up_in, up_out, layout="in_out",
                    parts=(FusedPart("gate", 0, half), FusedPart("up", half, up_out)),
                    bias=f"blocks.{n}.up.bias",
                )
            )
            down_out, down_in = shapes[f"blocks.{n}.down.weight"]
            layers.append(
                DenseLayer(f"blocks.{n}.down", down_in, down_out, bias=f"blocks.{n}.down.bias")
            )
            n += 1
        labels, head_in = shapes["head.weight"]
        layers.append(DenseLayer("head", head_in, labels, bias="head.bias"))
        return layers

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        # The toy GGUF layout stores the fused layer as up|gate instead of gate|up: a rule on
        # rows, so code rather than a table.
        if convention != "gguf" or self.names.foreign(layer_path, "gguf") is None:
            return None
        if not layer_path.endswith(".up"):
            return None
        half = int(checkpoint.config_value("intermediate_size", what="toymlp's gguf row order"))
        return [*range(half, 2 * half), *range(half)]

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        import torch
        from torch import nn

        from loraformat.architecture.modules import Dense

        if options.with_past:
            raise checkpoint.error("toymlp has no KV cache")

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

        class Model(nn.Module):
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

        module = Model()
        state = {k: tensors[k] for k in module.state_dict()}
        module.load_state_dict(state, strict=True, assign=True)
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


@hookimpl
def loraformat_architectures() -> list[ArchitectureBase]:
    return [ToyMLP()]
