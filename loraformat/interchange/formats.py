"""The adapter formats the interchange knows: each name, the module holding its codec, aliases,
and the output suffixes that imply one. Below both the package's ``convert`` and the front door,
which share it."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import LoraformatError

#: The loraformat format's own name.
NATIVE = "loraformat"
#: format name → module holding its ``CODEC``; detection tries them in this order.
CODECS: dict[str, str] = {
    "loraformat": "loraformat.interchange.native",
    "peft": "loraformat.interchange.peft",
    "mlx": "loraformat.interchange.mlx",
    "gguf": "loraformat.interchange.gguf",
    "onnx_adapter": "loraformat.interchange.onnx_adapter",
    "loralib": "loraformat.interchange.loralib",
}
ALIASES = {"onnx-adapter": "onnx_adapter", "ort": "onnx_adapter", "lora": "loralib",
           "mlx-lm": "mlx", "mlx_lm": "mlx", "llama.cpp": "gguf", "native": "loraformat"}

#: output suffix → format, when ``to`` is not given.
SUFFIXES = {".onnx_adapter": "onnx_adapter", ".gguf": "gguf", ".pt": "loralib",
            ".pth": "loralib", ".bin": "loralib", ".safetensors": "loraformat"}


def formats() -> list[str]:
    return list(CODECS)


def codec(name: str) -> Any:
    """The codec object for a format name (or alias)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in CODECS:
        raise LoraformatError(
            None, f"unknown format {name!r} (known: {', '.join(CODECS)})"
        )
    return importlib.import_module(CODECS[key]).CODEC


__all__ = ["ALIASES", "CODECS", "NATIVE", "SUFFIXES", "codec", "formats"]
