"""ONNX export of a base model (merged with adapters, or with LoRA slots), KV-cache decoders and
ONNX Runtime fusions.

The names below are loaded on first use (PEP 562), so importing one submodule does not import the
others (each pulls in torch and the ONNX exporter).
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name → the submodule defining it
_API = {
    "DEFAULT_OPSET": "onnx",
    "ExportResult": "onnx",
    "export_onnx": "onnx",
    "verify": "onnx",
    "DecoderExportResult": "decoder",
    "export_decoder": "decoder",
    "verify_decoder": "decoder",
    "SlotExport": "slots",
    "export_with_slots": "slots",
    "OptimizeReport": "optimize",
    "optimize_file": "optimize",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
