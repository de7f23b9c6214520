"""The architecture of a checkpoint no installed plugin recognises.

A merge is arithmetic on named tensors: it needs the weight an adapter layer changes and the
layout it is stored in, nothing else. So every 2-D ``<path>.weight`` of such a checkpoint is a
dense layer at ``<path>``, read as ``nn.Linear`` ([out, in]), and every other 3-D tensor a stack of
expert weights at its own name; :meth:`GenericArchitecture.fit`
re-reads it for an adapter layer that says otherwise (an embedding table, or a Conv1D weight
stored [in, out]), going by the adapter layer's kind and shape. PEFT's module names equal the
checkpoint's layer paths for such models, so no name table is needed for PEFT.

What needs architecture knowledge — an ONNX export module, llama.cpp or MLX names, q/k row
orders, LoRA slots — refuses with one line naming the plugin that is missing.

The architecture id, which adapters made for the checkpoint carry in their manifest, is the
checkpoint's ``config.json`` ``model_type`` (``"opt"``, ``"gpt_neox"``, ``"t5"``), or
``"generic"`` when the checkpoint has no config (spec/FORMAT.md, manifest ``architecture``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import LoraformatError
from .layers import DenseLayer, ExportModel, ExportOptions
from .names import NameTable
from .protocol import ArchitectureBase, CheckpointInfo

#: The architecture id of a generically handled checkpoint without a ``model_type``.
GENERIC_ID = "generic"
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


def generic_id(config: Mapping[str, Any]) -> str:
    """The id a generically handled checkpoint with this config gets (see the module doc)."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and _ID.match(model_type.lower()):
        return model_type.lower()
    return GENERIC_ID


class GenericArchitecture(ArchitectureBase):
    """Any checkpoint: dense layers are its 2-D weights; everything else refuses."""

    description = "any checkpoint no plugin recognises (layers are its 2-D weights)"
    names = NameTable.empty()
    generic = True
    plugin = None

    def __init__(self, architecture_id: str = GENERIC_ID) -> None:
        self.id = architecture_id  # type: ignore[misc]

    @classmethod
    def for_checkpoint(cls, checkpoint: CheckpointInfo) -> GenericArchitecture:
        return cls(generic_id(checkpoint.config))

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        return any(len(s) == 2 for n, s in checkpoint.shapes.items() if n.endswith(".weight"))

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        shapes = checkpoint.shapes
        layers = []
        for name, shape in shapes.items():
            if not name.endswith(".weight") or len(shape) != 2:
                continue
            path = name.removesuffix(".weight")
            bias = path + ".bias" if path + ".bias" in shapes else None
            layers.append(DenseLayer(path, int(shape[1]), int(shape[0]), bias=bias))
        for name, shape in shapes.items():
            # A 3-D tensor may be a stack of expert weights (PEFT's target_parameters adapts
            # transformers' ``mlp.experts.gate_up_proj``); its orientation is decided by
            # :meth:`fit` from the adapter layer, read [E, out, in] until then.
            if len(shape) == 3 and not name.endswith(".bias"):
                layers.append(DenseLayer(name, int(shape[2]), int(shape[1]),
                                         experts=int(shape[0])))
        return layers

    @staticmethod
    def fit(layer: DenseLayer, kind: str, in_features: int, out_features: int) -> DenseLayer:
        """``layer`` as an adapter layer of ``kind`` and in→out features sees it.

        An embedding table [num, dim] is in=num, out=dim stored [in, out]; a linear layer whose
        features only fit the transposed weight is a Conv1D (PEFT's ``fan_in_fan_out``). A
        square linear weight is read as [out, in], as ``nn.Linear`` stores it.
        """
        if layer.experts is not None:
            return GenericArchitecture.fit_experts(layer, in_features, out_features)
        rows, cols = layer.stored_shape()
        if kind == "embedding":
            return DenseLayer(layer.path, rows, cols, layout="in_out", kind="embedding")
        if (out_features, in_features) != (rows, cols) and (in_features, out_features) == (
            rows, cols
        ):
            return DenseLayer(layer.path, rows, cols, layout="in_out", bias=layer.bias)
        return layer

    @staticmethod
    def fit_experts(layer: DenseLayer, in_features: int, out_features: int) -> DenseLayer:
        """A stack [E, a, b] as an expert adapter layer in→out sees it: [E, out, in] or [E, in,
        out], whichever the features fit; refused when both fit (in = out) — which axis is the
        input only the model's code knows (PEFT reads it from ``is_transposed``)."""
        _, rows, cols = layer.stored_shape()
        if (rows, cols) == (out_features, in_features) and (rows, cols) == (
            in_features, out_features
        ):
            raise LoraformatError(
                None,
                f"{layer.weight} is [{layer.experts}, {rows}, {cols}]: with input and output both "
                f"{rows}, which axis is the input cannot be told from the shapes, and no plugin "
                "states it; refusing to guess (an architecture plugin says, see spec/PLUGINS.md)",
            )
        if (rows, cols) == (in_features, out_features):
            return DenseLayer(layer.path, rows, cols, layout="in_out", experts=layer.experts)
        return layer

    def missing_plugin(self, checkpoint: CheckpointInfo, what: str) -> Exception:
        """The refusal for something only a plugin knows."""
        return checkpoint.error(
            f"{what} needs an architecture plugin for {self.id!r}, and none is installed "
            "(this checkpoint is handled generically: merge, unmerge and PEFT conversion work)"
        )

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        raise self.missing_plugin(checkpoint, f"{convention} row order")

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        raise self.missing_plugin(checkpoint, "ONNX export")
