"""ONNX model files: atomic saving with external data, below both merge (surgery) and export.

An ONNX model whose initializers exceed protobuf's 2 GB cap keeps them in an external data file
next to it. :func:`save_model` writes the model and that file so that a reader, or a kill at any
moment, sees either the old model with its data or the new one with its data. Initializers may
be lazy (``onnx_ir.LazyTensor``): each is materialised only while it is written, one at a time,
which is how a streamed export stays in bounded memory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .atomic import TMP_MARKER, make_parents, remove_made

#: Suffixes of a layer's two LoRA slot inputs (``<layer>.lora_A`` [in, r], ``<layer>.lora_B``
#: [r, out]): ONNX Runtime's and Olive's multi-LoRA convention, which slot graphs, the runtime
#: session and ``.onnx_adapter`` files share.
SLOT_A, SLOT_B = ".lora_A", ".lora_B"
#: Above this many initializer bytes the weights go to an external data file (protobuf's cap).
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
#: With external data, initializers of at most this many bytes stay in the protobuf (what
#: ``onnx_ir.save`` does by default; a writer that fills the data file itself does the same).
STAGED_INLINE_BYTES = 256


def initializer_bytes(model: Any) -> int:
    """Total bytes of an onnx_ir model's initializers (lazy ones are not evaluated)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


@contextlib.contextmanager
def weights_as_inputs(model: Any, names: set[str]) -> Iterator[list[Any]]:
    """While active, the initializers of the onnx_ir ``model`` named in ``names`` are graph inputs
    without values (appended after the real inputs), and initializers again afterwards, in place.

    A pass then cannot fold, rename or deduplicate them (onnxscript's optimizer), and a saved
    graph holds no weights (the graph cache). Yields the values moved."""
    graph = model.graph
    hidden = []
    for name in list(graph.initializers):
        if name in names:
            value = graph.initializers.pop(name)
            hidden.append((value, value.const_value))
            value.const_value = None
            graph.inputs.append(value)
    try:
        yield [value for value, _ in hidden]
    finally:
        for value, tensor in hidden:
            graph.inputs.remove(value)
            value.const_value = tensor
            graph.register_initializer(value)


def ort_load_error(path: Path, exc: Exception, doing: str) -> str:
    """The one-line message for ONNX Runtime failing to ``doing`` the model at ``path``, with the
    likely reason where it is a known one: a bfloat16 model on a provider without bf16 kernels
    (ONNX Runtime's CPU provider has none; CUDAExecutionProvider does)."""
    text = " ".join(str(exc).split())
    message = f"ONNX Runtime cannot {doing} the model: {text}"
    if "NOT_IMPLEMENTED" in text and _is_bfloat16(path):
        message += (
            " — a bfloat16 model runs on CUDAExecutionProvider only (ONNX Runtime has no CPU "
            "kernels for bfloat16); export with --dtype float32/float16/int4 for CPU"
        )
    return message


def _is_bfloat16(path: Path) -> bool:
    import onnx

    try:
        graph = onnx.load(os.fspath(path), load_external_data=False).graph
    except Exception:  # unreadable: no reason to add
        return False
    bf16 = onnx.TensorProto.BFLOAT16
    return any(i.type.tensor_type.elem_type == bf16 for i in graph.input) or any(
        t.data_type == bf16 for t in graph.initializer
    )


class Staging:
    """The temporary directory beside ``out`` that a model and its data file are written into
    before :func:`save_model` puts them in place, and the data file's name: ``<out name>.data``,
    or ``<out name>.1.data`` while a file of the first name is in use (the two alternate, so a
    replaced model's data is never overwritten before the new model is in place).

    Made before anything is written, so that a writer may fill :attr:`data_path` while the graph
    is still being built (:mod:`loraformat.export.prewrite`); :meth:`remove` deletes whatever is
    left in it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        names = [out.name + ".data", out.name + ".1.data"]
        data_name = next((n for n in names if not out.with_name(n).exists()), names[0])
        if out.with_name(data_name).exists():  # both exist (a leftover): reuse the unreferenced
            data_name = names[1] if references(out, names[0]) else names[0]
        self.data_names = names
        self.data_name = data_name
        self.made = make_parents(out)  # removed again if the model never lands
        self.dir = Path(tempfile.mkdtemp(prefix=TMP_MARKER, suffix="-" + out.name, dir=out.parent))

    @property
    def data_path(self) -> Path:
        return self.dir / self.data_name

    @property
    def model_path(self) -> Path:
        return self.dir / self.out.name

    def remove(self) -> None:
        if not self.dir.exists():
            return
        for file in self.dir.iterdir():
            with contextlib.suppress(OSError):
                file.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()
        if not self.out.exists():
            remove_made(self.made)


def save_model(
    model: Any,
    out: Path,
    external_data: bool | None = None,
    check: Callable[[Path], None] | None = None,
    staging: Staging | None = None,
    prepared: bool = False,
) -> Path | None:
    """Write ``model`` atomically to ``out``.

    Weights go to an external data file next to it when ``external_data`` (``None``: when over
    2 GB), named as :class:`Staging` says. Returns the data file, if any.

    Both files are written into the staging directory (``staging``, else one made here),
    ``check(temporary model path)`` runs (it may raise to abandon the output), the data file is
    renamed into place, then the model; only then is the previous model's data file (either
    name) removed. A reader — or a kill at any moment — therefore sees the old model with its
    data, or the new one with its data, never a model whose data is missing or foreign; at worst
    an unreferenced data file is left behind. ``prepared``: the model's large initializers
    already live in ``staging``'s data file (external tensors naming it), so the model is
    written as it is; a given ``staging`` is the caller's to remove.
    """
    import onnx_ir as ir

    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    own = staging is None
    stage = Staging(out) if staging is None else staging
    data_name = stage.data_name
    try:
        tmp_model = stage.model_path
        if external_data and not prepared:
            ir.save(model, tmp_model, external_data=data_name,
                    size_threshold_bytes=STAGED_INLINE_BYTES)
        else:  # inline, or already external in the staging data file
            ir.save(model, tmp_model)
        for file in (stage.data_path, tmp_model):
            if file.exists():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        if check is not None:
            check(tmp_model)
        data_path = None
        if external_data:
            data_path = out.with_name(data_name)
            os.replace(stage.data_path, data_path)
        os.replace(tmp_model, out)
        for name in stage.data_names:  # the replaced model's data, now unreferenced
            if name != (data_name if external_data else None):
                with contextlib.suppress(OSError):
                    out.with_name(name).unlink()
        return data_path
    finally:
        if own:
            stage.remove()


def references(model_path: Path, data_name: str) -> bool:
    """Whether the ONNX file at ``model_path`` (if any) keeps weights in ``data_name``."""
    if not model_path.is_file():
        return False
    try:
        import onnx

        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # an unreadable old model: treat its data as unreferenced
        return False
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data_name:
                return True
    return False


__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "STAGED_INLINE_BYTES",
    "Staging",
    "initializer_bytes",
    "references",
    "save_model",
]
