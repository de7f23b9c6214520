"""The plugin contract, version 2: an architecture is an object the core asks questions.

A plugin module declares ``LORAFORMAT_PLUGIN_API = 2`` and implements one pluggy hook,
``loraformat_architectures()``, returning :class:`Architecture` objects. The core detects a
checkpoint's architecture once and then calls that object directly: no hook sees an architecture
it does not provide. Every method receives the :class:`CheckpointInfo` it is about, so a plugin's
error names the real file. The full contract, with a worked example, is spec/PLUGINS.md.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..errors import LoraformatError
from .layers import DenseLayer, ExpertStorage, ExportModel, ExportOptions
from .names import NameTable

#: The major version of the plugin contract this loraformat speaks. A plugin declares the version
#: it was written for as the module attribute ``LORAFORMAT_PLUGIN_API``; any other major version is
#: reported by name and skipped.
PLUGIN_API_VERSION = 2

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a plugin may know about a checkpoint: headers and config, never tensor data.

    ``path`` is the checkpoint (directory or file) as the user gave it, ``None`` when there is no
    file (a PEFT adapter's partial config, a test). ``config`` is its ``config.json`` (``{}`` when
    absent); ``shapes`` every tensor's shape, read from the safetensors headers.
    """

    path: Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def error(self, message: str) -> LoraformatError:
        """A :class:`LoraformatError` naming this checkpoint (raise it)."""
        return LoraformatError(self.path, message)

    def config_error(self, message: str) -> LoraformatError:
        """A :class:`LoraformatError` naming this checkpoint's ``config.json``."""
        where: str | os.PathLike[str] | None = CONFIG_FILE
        if self.path is not None:
            where = self.path / CONFIG_FILE if self.path.is_dir() else self.path
        return LoraformatError(where, message)

    def config_value(self, *keys: str, default: Any = None, what: str = "") -> Any:
        """The first of ``keys`` present (and not None) in the config, else ``default``.

        With ``default=None`` and ``what`` given, a missing value is an error naming the keys and
        the config file, since ``what`` cannot be done without it.
        """
        for key in keys:
            if self.config.get(key) is not None:
                return self.config[key]
        if default is None and what:
            raise self.config_error(
                f"{what} needs {' or '.join(repr(k) for k in keys)}, which is missing"
            )
        return default


@dataclass(frozen=True)
class ModelShape:
    """The sizes generation, KV caches and graph fusions need (decoders; encoders may omit
    the KV fields by setting them equal to the attention ones)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class LayerRepeat:
    """How an export module repeats its layers, so the exporter can trace a few and repeat them.

    The export module has one ``nn.ModuleList`` as long as ``kinds``, the layers in order.
    ``kinds[i]`` is any hashable value; two layers of equal kind MUST give the same graph but for
    their layer index (their own weights, cache inputs and outputs). ``depth_key`` is the config
    entry that holds the number of layers (dotted for a nested config, as
    ``text_config.num_hidden_layers``; ``None`` where the module counts the layers from the
    tensors it is given): the exporter builds the module from a config and tensors cut to the
    first few layers, traces that, and repeats each kind's traced layer for the rest
    (``loraformat/export/repeat.py``).
    """

    kinds: tuple[Hashable, ...]
    depth_key: str | None = None


@runtime_checkable
class Architecture(Protocol):
    """One architecture a plugin provides. See :class:`ArchitectureBase` for the defaults."""

    #: Lowercase, unique across installed plugins (``"llama"``, ``"qwen2"``).
    id: str
    description: str
    #: Checkpoint layer paths ↔ foreign names (``peft``, ``gguf``, ``mlx``, …).
    names: NameTable
    #: llama.cpp's ``general.architecture`` for this family, ``None`` where llama.cpp has none.
    gguf_architecture: str | None
    #: ONNX Runtime transformer optimizer ``model_type`` for ``--optimize``; ``None``: no fusions.
    ort_model_type: str | None

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        """Whether the checkpoint is this architecture. MUST be exact: a relative with another
        attention (Qwen2 for LLaMA, Mistral for LLaMA) is not this architecture. MUST return
        ``False``, not raise, for an empty checkpoint."""
        ...

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        """Every layer that can carry an adapter, in checkpoint order; each ``stored_shape()``
        MUST equal its weight tensor's shape."""
        ...

    def default_targets(self, checkpoint: CheckpointInfo) -> list[str]:
        """Module-name suffixes targeted by default, as PEFT does (``["q_proj", "v_proj"]``)."""
        ...

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        """The output-row order ``convention`` stores the layer's weight in, or ``None``.

        Entry ``i`` is the checkpoint row that lands at row ``i`` in the foreign weight (llama.cpp
        permutes q/k rows for its rotary layout). Code, because it cannot be a table."""
        ...

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        """An export-ready ``torch.nn.Module`` built from ``tensors`` (name → torch.Tensor) whose
        state-dict keys equal the checkpoint's tensor names. Raise a :class:`LoraformatError`
        (``checkpoint.error(...)``) for what cannot be exported."""
        ...

    def model_shape(self, checkpoint: CheckpointInfo) -> ModelShape | None:
        """Layer count, heads, KV heads, head size, hidden size and vocabulary, or ``None``."""
        ...

    # Optional (the core asks only where it is defined; ArchitectureBase answers None):
    # def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
    #     """How the export module repeats its layers; None: the exporter traces every layer."""
    # def left_out(self, checkpoint: CheckpointInfo) -> list[str]:
    #     """Stored tensors the export module leaves out (a multimodal checkpoint's towers)."""
    # def column_permutation(
    #     self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    # ) -> Sequence[int] | None:
    #     """The input-column order ``convention`` stores the layer's weight in (entry j: the
    #     checkpoint column at column j), or None: row_permutation's counterpart for inputs."""
    # expert_storage: tuple[ExpertStorage, ...]
    #     """How checkpoints store the stacked expert parameters PEFT's target_parameters adapt."""
    # peft_weight_parameters: tuple[str, ...]
    #     """Layers PEFT adapts through target_parameters (``<path>.weight``), not as modules."""


class ArchitectureBase:
    """Defaults for every optional part of :class:`Architecture`; subclass and override.

    Class attributes carry the data (``id``, ``description``, ``names``, ``targets``,
    ``gguf_architecture``, ``ort_model_type``); methods only what is a computation.
    """

    id: ClassVar[str]
    description: ClassVar[str]
    names: ClassVar[NameTable] = NameTable.empty()
    gguf_architecture: ClassVar[str | None] = None
    ort_model_type: ClassVar[str | None] = None
    #: PEFT's default ``target_modules`` for this family.
    targets: ClassVar[tuple[str, ...]] = ()
    #: Mixture-of-experts families: how the checkpoint stores each stacked expert parameter of a
    #: block, in the order the experts module registers them (see :class:`ExpertStorage`).
    expert_storage: ClassVar[tuple[ExpertStorage, ...]] = ()
    #: Block-relative paths of layers PEFT can adapt only through ``target_parameters``
    #: (``<path>.weight``) because transformers' module there is no ``nn.Linear`` (gpt-oss's
    #: router ``mlp.router``).
    peft_weight_parameters: ClassVar[tuple[str, ...]] = ()

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        raise NotImplementedError

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        raise NotImplementedError

    def default_targets(self, checkpoint: CheckpointInfo) -> list[str]:
        return list(self.targets)

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        return None

    def column_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        """The input-column order ``convention`` stores the layer's weight in, or ``None``
        (llama.cpp reorders Qwen3.5's value heads in ``out_proj``'s inputs)."""
        return None

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        raise checkpoint.error(f"the {self.id!r} architecture has no ONNX export module")

    def model_shape(self, checkpoint: CheckpointInfo) -> ModelShape | None:
        return None

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        """How the export module repeats its layers (:class:`LayerRepeat`); ``None``, the
        default, has the exporter trace every layer — always right, slower for deep models."""
        return None

    def left_out(self, checkpoint: CheckpointInfo) -> list[str]:
        """The stored tensors the export module does not use, so an ONNX merge or export leaves
        them out (a multimodal checkpoint's vision tower and projector beside the language
        model it exports); the commands name them. Default: none."""
        return []

    def __repr__(self) -> str:
        return f"<architecture {self.id}>"
