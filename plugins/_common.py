"""Helpers shared by the built-in plugins (nothing here is part of the plugin contract)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from loraformat.architecture import CheckpointInfo, DenseLayer, LayerRepeat


def detect_by_names(
    checkpoint: CheckpointInfo, model_type: str, prefixes: Sequence[str], *required: str
) -> bool:
    """Detection for a family whose relatives share its tensor names: ``config.json``'s
    ``model_type`` decides when present; otherwise every ``required`` tensor must exist under one
    of ``prefixes`` (a bare ``.safetensors`` file)."""
    said = checkpoint.config.get("model_type")
    if said is not None:
        return bool(said == model_type)
    names = checkpoint.shapes
    return any(all(prefix + name in names for name in required) for prefix in prefixes)


def model_type_is(config: Mapping[str, Any], model_type: str, class_prefix: str) -> bool | None:
    """True/False when ``config`` says which model it is; None when it says nothing."""
    if config.get("model_type"):
        return config["model_type"] == model_type
    archs = config.get("architectures") or []
    if archs:
        return any(str(a).startswith(class_prefix) for a in archs)
    return None




def optional_linear(tensor_shapes: Mapping[str, tuple[int, ...]], path: str) -> DenseLayer | None:
    """The ``nn.Linear`` at ``path`` ([out, in] weight, bias if stored); None if it has no 2-D
    weight."""
    shape = tensor_shapes.get(path + ".weight")
    if shape is None or len(shape) != 2:
        return None
    bias = path + ".bias" if path + ".bias" in tensor_shapes else None
    return DenseLayer(path, in_features=shape[1], out_features=shape[0], bias=bias)


def encoder_linears(
    tensor_shapes: Mapping[str, tuple[int, ...]],
    layer_prefix: str,
    per_layer: Iterable[str],
    heads: Iterable[str] = (),
) -> list[DenseLayer]:
    """The ``nn.Linear`` layers of a BERT-style encoder, in checkpoint order.

    For each numbered layer ``<layer_prefix>.<i>`` (counted while ``<layer_prefix>.<i>.<first of
    per_layer>.weight`` exists), its ``per_layer`` suffixes in order; then the ``heads`` paths
    (pooler, classifier). Linears a checkpoint lacks are skipped.
    """
    suffixes = list(per_layer)
    paths: list[str] = []
    i = 0
    while f"{layer_prefix}.{i}.{suffixes[0]}.weight" in tensor_shapes:
        paths += [f"{layer_prefix}.{i}.{name}" for name in suffixes]
        i += 1
    found = (optional_linear(tensor_shapes, path) for path in [*paths, *heads])
    return [layer for layer in found if layer is not None]




class EncoderParts:
    """Torch modules of a BERT-style encoder, sized from the checkpoint's own tensors (the export
    modules of ``bert`` and ``vit`` build from these). A missing tensor is an error naming the
    checkpoint."""

    def __init__(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], arch: str, heads: int,
        eps: float,
    ) -> None:
        self.checkpoint, self.tensors, self.arch = checkpoint, tensors, arch
        self.heads, self.eps = heads, eps

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise self.checkpoint.error(f"{self.arch}: checkpoint lacks {name}")
        return tuple(self.tensors[name].shape)

    def dense(self, path: str) -> Any:
        from loraformat.architecture.modules import Dense

        out_f, in_f = self.shape(path + ".weight")
        return Dense(in_f, out_f, bias=path + ".bias" in self.tensors)

    def layer_norm(self, path: str) -> Any:
        from torch import nn

        return nn.LayerNorm(self.shape(path + ".weight")[0], eps=self.eps)

    def self_attention(self, path: str) -> Any:
        from loraformat.architecture.modules import EncoderSelfAttention

        query, key, value = (self.dense(f"{path}.{n}") for n in ("query", "key", "value"))
        return EncoderSelfAttention(query, key, value, self.heads)


def uniform_layers(
    checkpoint: CheckpointInfo, pattern: str, depth_key: str | None
) -> LayerRepeat | None:
    """A :class:`LayerRepeat` of identical layers, counted by the layer indices ``pattern`` (a
    regex whose one group is the index) finds in the tensor names; ``None`` when they are not
    0..n-1, or when ``depth_key`` is given and the config says another depth."""
    found = re.compile(pattern)
    ids = {int(m.group(1)) for name in checkpoint.shapes if (m := found.search(name))}
    if not ids or ids != set(range(len(ids))):
        return None
    if depth_key is not None and checkpoint.config.get(depth_key) != len(ids):
        return None
    return LayerRepeat(kinds=("layer",) * len(ids), depth_key=depth_key)











