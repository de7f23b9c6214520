"""Small tools every plugin author needs: finding a checkpoint's prefix, dense layers from stored
shapes, loading tensors into an export module by name, activations by transformers' names.

Importing this module does not import torch; the functions that need it import it when called.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loraformat.errors import LoraformatError

from .layers import DenseLayer, FusedPart


def find_prefix(names: Sequence[str], pattern: str) -> str | None:
    """The prefix before the first match of ``pattern`` (a regex anchored after the prefix).

    ``find_prefix(names, r"layers\\.\\d+\\.")`` is ``"model."`` for ``model.layers.0.…``, ``""``
    for ``layers.0.…``, ``None`` when nothing matches.
    """
    rx = re.compile(r"^(.*?)" + pattern)
    for name in names:
        m = rx.match(name)
        if m:
            return m.group(1)
    return None


def dense_from_shape(
    path: str,
    shape: Sequence[int],
    layout: str = "out_in",
    kind: str = "linear",
    parts: tuple[FusedPart, ...] = (),
    bias: str | None = None,
) -> DenseLayer:
    """A :class:`DenseLayer` with features read from the stored weight shape (so they agree)."""
    if len(shape) != 2:
        raise LoraformatError(None, f"{path}.weight has shape {list(shape)}, expected 2 dimensions")
    rows, cols = int(shape[0]), int(shape[1])
    in_f, out_f = (cols, rows) if layout == "out_in" else (rows, cols)
    return DenseLayer(path, in_f, out_f, layout=layout, kind=kind, parts=parts, bias=bias)  # type: ignore[arg-type]


def activation_function(name: str, error: str) -> Callable[[Any], Any]:
    """The torch function for a config's ``hidden_act`` (transformers' ACT2FN names).

    An unknown name is a :class:`LoraformatError` reading ``"<error> '<name>' (known: …)"``.
    """
    import torch
    import torch.nn.functional as F

    acts = {
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,
        "tanh": torch.tanh,
    }
    if name not in acts:
        raise LoraformatError(None, f"{error} {name!r} (known: {', '.join(sorted(acts))})")
    return acts[name]


def load_tensors(module: Any, tensors: Mapping[str, Any], where: str) -> None:
    """Copy ``tensors`` into ``module``'s state dict by name; every state-dict key is required."""
    import torch

    state = module.state_dict()
    missing = [k for k in state if k not in tensors]
    if missing:
        raise LoraformatError(
            None,
            f"{where}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
            f"e.g. {missing[0]}",
        )
    loaded = {}
    for key, ref in state.items():
        value = tensors[key]
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(ref.shape):
            raise LoraformatError(
                None, f"{where}: {key} has shape {list(value.shape)}, expected {list(ref.shape)}"
            )
        loaded[key] = value
    module.load_state_dict(loaded, strict=True, assign=True)
    module.eval()


__all__ = ["activation_function", "dense_from_shape", "find_prefix", "load_tensors"]
