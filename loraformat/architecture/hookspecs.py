"""The hook specifications every architecture plugin implements (pluggy, project "loraformat").

A plugin is a module (or object) with functions named like the hooks below, decorated with
``loraformat.architecture.hookimpl``, registered through the ``loraformat.plugins`` entry-point
group. Every architecture-specific fact lives behind these hooks; the core knows none.

Hooks marked *first result* are called on every plugin until one returns something other than
``None``: a plugin MUST return ``None`` for an ``architecture`` it does not provide. The full
contract, with a worked example, is in spec/PLUGINS.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

from .layers import ArchitectureInfo, DenseLayer, ExportModel, ExportOptions

hookspec = pluggy.HookspecMarker("loraformat")

#: Foreign naming conventions a plugin may translate layer paths to and from.
CONVENTIONS = ("peft", "gguf", "mlx")


@hookspec
def loraformat_architectures() -> list[ArchitectureInfo]:
    """The architectures this plugin provides (ids are lowercase, e.g. ``"gpt2"``)."""


@hookspec(firstresult=True)
def loraformat_detect(config: Mapping[str, Any], tensor_names: Sequence[str]) -> str | None:
    """The architecture id of a checkpoint with this ``config.json`` (may be empty) and tensors.

    Return ``None`` when the checkpoint is not one of this plugin's architectures.
    """


@hookspec(firstresult=True)
def loraformat_dense_layers(
    architecture: str, config: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> list[DenseLayer] | None:
    """Every layer of the checkpoint that can carry an adapter, in checkpoint order.

    Shapes come from the safetensors headers; no tensor data is available or needed. Each layer's
    ``stored_shape()`` MUST equal the shape of its ``weight`` tensor.
    """


@hookspec(firstresult=True)
def loraformat_default_targets(architecture: str, config: Mapping[str, Any]) -> list[str] | None:
    """Module-name suffixes targeted by default, as PEFT does (e.g. ``["q_proj", "v_proj"]``)."""


@hookspec(firstresult=True)
def loraformat_foreign_name(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> str | None:
    """The name ``convention`` uses for the layer at ``layer_path``.

    ``peft``: the in-memory module name (without PEFT's ``base_model.model.`` prefix) — it differs
    from the checkpoint name when transformers renames modules on load. ``gguf``: llama.cpp's
    tensor name without ``.weight`` (``blk.0.attn_q``). ``mlx``: MLX-LM's module path. Return
    ``None`` when the layer has no name in that convention.
    """


@hookspec(firstresult=True)
def loraformat_layer_path(
    architecture: str, config: Mapping[str, Any], foreign_name: str, convention: str
) -> str | None:
    """The inverse of ``loraformat_foreign_name``: a layer path, or ``None`` if unknown."""


@hookspec(firstresult=True)
def loraformat_foreign_row_permutation(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> Sequence[int] | None:
    """A permutation of output rows the convention stores the layer's weight in, or ``None``.

    Entry ``i`` is the checkpoint row that lands at row ``i`` in the foreign weight (llama.cpp
    permutes LLaMA's q/k rows for its rotary layout). Converting an adapter permutes B's rows the
    same way; A is untouched.
    """


@hookspec(firstresult=True)
def loraformat_export_model(
    architecture: str, config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel | None:
    """An export-ready ``torch.nn.Module`` built from ``tensors`` (name → torch.Tensor).

    Plain torch, no cache objects or data-dependent control flow, so ``torch.onnx.export`` traces
    it; its state-dict keys equal the checkpoint's tensor names. See :class:`ExportModel`.
    """
