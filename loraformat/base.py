"""A base model: a checkpoint plus what its architecture plugin says about it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import architecture as arch
from .checkpoint import Checkpoint
from .errors import LoraformatError
from .sniff import require_base


@dataclass
class BaseModel:
    checkpoint: Checkpoint
    architecture: str

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    @cached_property
    def layers(self) -> dict[str, arch.DenseLayer]:
        """Every adaptable layer, by layer path, with its checked stored shape."""
        found = arch.dense_layers(self.architecture, self.config, self.checkpoint.shapes())
        layers = {}
        for layer in found:
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

    def default_target_paths(self) -> list[str]:
        suffixes = arch.default_targets(self.architecture, self.config)
        return [p for p, layer in self.layers.items() if layer.module_name in suffixes]

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> BaseModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_base(path: str | os.PathLike[str], architecture: str | None = None) -> BaseModel:
    """Open a checkpoint and detect its architecture (or use the one given)."""
    require_base(path)  # another kind of file is refused saying what it is, not how it fails
    checkpoint = Checkpoint(path)
    try:
        if architecture is None:
            architecture = arch.detect(checkpoint.config, checkpoint.names())
            if architecture is None:
                known = ", ".join(sorted(arch.registry().architectures())) or "none"
                raise LoraformatError(
                    path, f"no installed plugin recognises this checkpoint (installed: {known})"
                )
        return BaseModel(checkpoint, architecture)
    except BaseException:
        checkpoint.close()
        raise
