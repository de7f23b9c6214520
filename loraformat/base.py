"""A base model: a checkpoint plus the architecture that reads it (a plugin's, or generic)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .architecture import CheckpointInfo, DenseLayer, detect, get_architecture, registry
from .architecture.generic import GENERIC_ID, GenericArchitecture, generic_id
from .checkpoint import Checkpoint, open_checkpoint
from .errors import LoraformatError
from .sniff import CHECKPOINT, GGUF_MODEL, SAFETENSORS_MODEL, require_base


@dataclass
class BaseModel:
    checkpoint: Checkpoint
    #: The architecture object (:class:`~loraformat.architecture.registry.PluginArchitecture`,
    #: or :class:`~loraformat.architecture.generic.GenericArchitecture` when no plugin
    #: recognises the checkpoint).
    arch: Any

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    @property
    def architecture(self) -> str:
        """The architecture id adapters for this base carry."""
        return str(self.arch.id)

    def read_as(self, architecture: str) -> BaseModel | None:
        """This base file read through plugin ``architecture`` instead, where the file is equally
        that architecture's (llama.cpp writes Mistral as ``llama``, OLMo 3 as ``olmo2``: one GGUF
        model, several plugins); None where it is not."""
        if architecture == self.architecture or not hasattr(self.checkpoint, "arch_name"):
            return None
        from .gguf_model import open_gguf, written_as

        if architecture not in written_as(self.checkpoint.arch_name):
            return None
        return BaseModel(*open_gguf(self.path, architecture))

    @property
    def required_architecture(self) -> str | None:
        """The architecture an adapter must be for; ``None`` when the checkpoint does not say
        (handled generically and without a ``config.json``: a bare ``.safetensors`` file)."""
        return None if self.architecture == GENERIC_ID else self.architecture

    @property
    def generic(self) -> bool:
        """Whether no plugin recognised the checkpoint (see loraformat.architecture.generic)."""
        return bool(getattr(self.arch, "generic", False))

    @cached_property
    def info(self) -> CheckpointInfo:
        """What the architecture may know: path, config and every tensor's shape."""
        return CheckpointInfo(self.path, self.config, self.checkpoint.shapes())

    @cached_property
    def layers(self) -> dict[str, DenseLayer]:
        """Every adaptable layer, by layer path, with its checked stored shape."""
        layers = {}
        for layer in self.arch.dense_layers(self.info):
            stored = layer.weight in self.checkpoint
            actual = self.checkpoint.info(layer.weight).shape if stored else None
            if actual != layer.stored_shape():
                raise LoraformatError(
                    self.path,
                    f"plugin {self.architecture!r} reports {layer.weight} as "
                    f"{list(layer.stored_shape())}, "
                    f"checkpoint has {list(actual) if actual else 'none'}",
                )
            layers[layer.path] = layer
        return layers

    def layer_as(self, path: str, kind: str, in_features: int, out_features: int) -> DenseLayer:
        """The layer at ``path`` as an adapter layer of ``kind`` and in→out features sees it: a
        plugin's layer as it is; a generic checkpoint's re-read by
        :meth:`GenericArchitecture.fit` (an embedding table, a Conv1D weight)."""
        layer = self.layers[path]
        if self.generic:
            try:
                return GenericArchitecture.fit(layer, kind, in_features, out_features)
            except LoraformatError as exc:
                raise LoraformatError(self.path, exc.message) from None
        return layer

    def layers_for(self, specs: Mapping[str, Any]) -> dict[str, DenseLayer]:
        """:attr:`layers`, each adapted layer (``specs``: path → anything with ``kind``,
        ``in_features``, ``out_features``) as :meth:`layer_as` gives it."""
        layers = dict(self.layers)
        for path, spec in specs.items():
            if path in layers:
                layers[path] = self.layer_as(path, spec.kind, spec.in_features, spec.out_features)
        return layers

    @cached_property
    def left_out(self) -> dict[str, int]:
        """What an ONNX merge or export of this base leaves out (the architecture's
        ``left_out``), grouped: the shortest dotted prefix of each left-out tensor that no kept
        tensor shares (``vision_tower``, ``multi_modal_projector``) → its number of tensors."""
        out = set(self.arch.left_out(self.info))
        kept = {name.rsplit(".", n)[0] for name in self.info.shapes if name not in out
                for n in range(name.count(".") + 1)}
        groups: dict[str, int] = {}
        for name in sorted(out):
            parts = name.split(".")
            group = next((p for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1))
                          if p not in kept), name)
            groups[group] = groups.get(group, 0) + 1
        return groups

    def default_target_paths(self) -> list[str]:
        suffixes = self.arch.default_targets(self.info)
        return [p for p, layer in self.layers.items() if layer.module_name in suffixes]

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> BaseModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_base(path: str | os.PathLike[str], architecture: str | None = None) -> BaseModel:
    """Open a checkpoint and detect its architecture (or use the one given).

    A checkpoint no installed plugin recognises is handled generically (its architecture id is
    its ``model_type``), as long as it has a 2-D weight to adapt.
    """
    require_base(path)  # another kind of file is refused saying what it is, not how it fails
    checkpoint = open_checkpoint(path)
    try:
        info = CheckpointInfo(checkpoint.path, checkpoint.config, checkpoint.shapes())
        found = None
        if architecture is None:
            found = detect(info)
        elif architecture in registry().architectures() or architecture != generic_id(
            checkpoint.config
        ):
            return BaseModel(checkpoint, get_architecture(architecture, path))
        if found is None:
            generic = GenericArchitecture.for_checkpoint(info)
            if not generic.detect(info):
                raise LoraformatError(
                    path, "no installed plugin recognises this checkpoint, and it has no 2-D "
                    "weight to handle generically",
                )
            return BaseModel(checkpoint, generic)
        return BaseModel(checkpoint, found)
    except BaseException:
        checkpoint.close()
        raise


def open_adapter_base(
    path: str | os.PathLike[str], architecture: str | None = None
) -> BaseModel:
    """A base that adapters are read and written through (names, shapes, row order): a
    checkpoint (:func:`open_base`) or a llama.cpp GGUF model, whose architecture is the plugin
    written as its ``general.architecture`` (``architecture``: which, where several are)."""
    if require_base(path, (CHECKPOINT, SAFETENSORS_MODEL, GGUF_MODEL)).format != GGUF_MODEL:
        return open_base(path, architecture)
    from .gguf_model import open_gguf

    return BaseModel(*open_gguf(path, architecture))


def as_base(base: str | os.PathLike[str] | BaseModel | None) -> BaseModel | None:
    """``base`` opened with :func:`open_adapter_base` if it is a path; a :class:`BaseModel` or
    ``None`` as it is (for functions taking either)."""
    if base is None or isinstance(base, BaseModel):
        return base
    return open_adapter_base(base)
