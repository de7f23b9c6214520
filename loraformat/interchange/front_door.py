"""One front door for adapter inputs: any format, detected by content, opened as an Adapter.

Every command that takes an adapter (and the runtime :class:`~loraformat.runtime.Session`) opens
it here. :func:`identify_adapter` asks :func:`loraformat.sniff.identify` what the path is — magic
bytes, headers, config files, not the extension — and refuses anything that is not an adapter in
one line naming what it is instead ("is a llama.cpp GGUF model, not a LoRA adapter"). A codec
added to :data:`~loraformat.interchange.CODECS` under a name ``sniff`` does not know is asked
through its own ``sniff(path)`` first, so a new format stays one module.
:func:`read_adapter` then hands the path to the codec that owns the format (this package's
``native``, ``peft``, ``mlx``, ``gguf``, ``onnx_adapter``, ``loralib`` modules) and returns the
adapter with the conversion :class:`Report`: which format was read, and what reading it into the
loraformat model changed (``notes``: scales folded, representation changes that keep ΔW;
``lossy``: what could not be carried, only with ``lossy=True``).

A loraformat adapter is opened lazily (:func:`loraformat.format.adapter.load`, header only); a
foreign one is converted in memory and the base (``base=``: a checkpoint path or an open
:class:`~loraformat.base.BaseModel`) is opened only for the read, where the format needs it
(llama.cpp row order and names for GGUF; shapes and names elsewhere). Inputs are never modified,
pickles are read only with ``torch.load(weights_only=True)`` (by the codecs), and every reader
checks its limits before it allocates (the safetensors reader's header limit, the GGUF walk's byte
budget in :mod:`loraformat.sniff`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import sniff
from ..errors import LoraformatError
from ..format.adapter import Adapter, load, validate
from ..format.safetensors_io import FLOAT_DTYPES
from ._common import Context, Progress, Report
from .formats import ALIASES, CODECS, codec

#: what each adapter format is called in messages ("file of format X given where Y is expected").
FORMAT_WHAT = {
    "loraformat": "a loraformat adapter",
    "peft": "a PEFT adapter directory",
    "mlx": "an MLX-LM adapter directory",
    "gguf": "a llama.cpp GGUF LoRA adapter",
    "onnx_adapter": "an ONNX Runtime adapter (.onnx_adapter)",
    "loralib": "a loralib (microsoft/LoRA) checkpoint",
}

#: for a file whose content matches no format: the reader its suffix names explains what is wrong
#: (a truncated .safetensors gets "truncated safetensors file", not "unknown format").
SUFFIX_OWNERS = {".safetensors": "loraformat", ".onnx_adapter": "onnx_adapter"}

#: formats whose reader cannot work without the base checkpoint, and why. (Others need it only
#: when their content does not say their model; their readers say so.)
NEEDS_BASE: dict[str, str] = {
    "gguf": "llama.cpp's tensor names and q/k row order depend on the model",
}


class NeedsBase(LoraformatError):
    """An adapter whose format is read only through its base checkpoint, given without one.
    ``needs``: what it is and why it needs the base, for a caller to say how to give it."""

    def __init__(self, path: str | os.PathLike[str], needs: str, how: str = "pass --base BASE"):
        self.needs = needs
        super().__init__(path, f"{needs}: {how}")


def _format_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in CODECS:
        raise LoraformatError(None, f"unknown format {name!r} (known: {', '.join(CODECS)})")
    return key


def identify_adapter(path: str | os.PathLike[str], from_: str | None = None) -> tuple[str, Path]:
    """(format name, path to read) for an adapter input, or one line saying what it is instead.

    ``from_`` forces the format where detection cannot tell (an unknown file, a pickle); a file
    that is recognisably something else is still refused with what it is.
    """
    path = Path(path)
    kind = sniff.identify(path)
    forced = _format_name(from_) if from_ else None
    if forced is None:  # a codec added to the interchange that sniff does not know: ask it
        for name in CODECS:
            if name not in sniff.ADAPTER_FORMATS and codec(name).sniff(path):
                return name, path
    elif forced not in sniff.ADAPTER_FORMATS:
        return forced, path
    if kind.is_adapter:
        if forced is not None and forced != kind.format:
            raise LoraformatError(path, f"is {kind.what}, not {FORMAT_WHAT[forced]} (--from "
                                        f"{forced}); drop --from or pass --from {kind.format}")
        if kind.read_path is None:
            raise LoraformatError(
                path, f"is {kind.what}: its rank and scale are in that config file; give the "
                "directory that holds both"
            )
        return kind.format, kind.read_path
    if kind.is_base:
        raise LoraformatError(path, f"is {kind.what}, not a LoRA adapter")
    if kind.format == sniff.PICKLE and forced in (None, "loralib"):
        if codec("loralib").sniff(path):  # torch.load(weights_only=True): tensors only
            return "loralib", path
        raise LoraformatError(
            path, f"is {kind.what} without '<module>.lora_A' tensors: not a LoRA adapter"
        )
    if forced is not None:
        return forced, path
    owner = SUFFIX_OWNERS.get(path.suffix.lower()) if path.is_file() else None
    if owner is not None:
        return owner, path  # unrecognised content under its suffix: its reader says what is wrong
    raise LoraformatError(
        path, f"is {kind.what}; not a LoRA adapter in any known format ({', '.join(CODECS)}); "
        "pass --from FMT if it is one"
    )


def check_base_given(path: str | os.PathLike[str], fmt: str, base: Any) -> None:
    """Refuse (:class:`NeedsBase`) a format read only through its base when none is given."""
    if base is None and fmt in NEEDS_BASE:
        raise NeedsBase(path, f"is {FORMAT_WHAT[fmt]}, read through its base model "
                              f"({NEEDS_BASE[fmt]})")


def _base_model(base: Any) -> Any:
    if base is None or hasattr(base, "layers"):
        return base
    from ..base import open_adapter_base  # refuses another kind of file saying what it is

    return open_adapter_base(base)


def read_adapter(
    path: str | os.PathLike[str],
    *,
    from_: str | None = None,
    base: Any = None,
    lossy: bool = False,
    progress: Progress = None,
    **options: Any,
) -> tuple[Adapter, Report]:
    """Open an adapter in any format as a loraformat :class:`Adapter`, with the :class:`Report`
    of what was read (``source_format``) and what converting changed (``notes``, ``lossy``).

    ``options``: codec options (``architecture``; ``alpha``/``rank``/``enable_lora`` for loralib).
    The caller closes the adapter.
    """
    fmt, read_path = identify_adapter(path, from_)
    report = Report(source_format=fmt, source=str(path))
    if fmt == "loraformat":
        adapter = load(read_path)
        report.layers = len(adapter.specs)
        return adapter, report
    check_base_given(path, fmt, base)
    reader = codec(fmt)
    known = {"architecture", *getattr(reader, "options", ())}
    given = {k: v for k, v in options.items() if v is not None}
    for key in given.keys() - known:
        raise LoraformatError(None, f"option {key!r} does not apply to {fmt}")
    opened = _base_model(base)
    try:
        ctx = Context(base=opened, allow_lossy=lossy, report=report, progress=progress,
                      options=given)
        adapter = reader.read(read_path, ctx)
    finally:
        if opened is not None and opened is not base:
            opened.close()
    return adapter, report


def open_adapter(
    path: str | os.PathLike[str] | Adapter,
    *,
    from_: str | None = None,
    base: Any = None,
    lossy: bool = False,
    **options: Any,
) -> Adapter:
    """:func:`read_adapter` without the report; an :class:`Adapter` passes through unchanged."""
    if isinstance(path, Adapter):
        return path
    return read_adapter(path, from_=from_, base=base, lossy=lossy, **options)[0]


def check_adapter(
    path: str | os.PathLike[str],
    *,
    from_: str | None = None,
    base: Any = None,
    **options: Any,
) -> tuple[str, list[str]]:
    """(format, problems) of an adapter checked against its own format's rules: the loraformat
    spec (:func:`~loraformat.format.adapter.validate`) for a loraformat adapter; for a foreign one,
    everything its reader enforces (config, tensor names and pairs, ranks, shapes) plus finite
    values. What converting would drop is not a problem of the file: ``inspect`` shows it.
    Never raises for bad input: a path that is no adapter (format ``""``), or one whose reader
    needs the base, is a problem line too."""
    try:
        fmt, read_path = identify_adapter(path, from_)
    except LoraformatError as exc:
        return "", [str(exc)]
    if fmt == "loraformat":
        return fmt, [str(problem) for problem in validate(read_path)]
    try:
        adapter, _ = read_adapter(path, from_=fmt, base=base, lossy=True, **options)
    except LoraformatError as exc:
        return fmt, [str(exc)]
    with adapter:
        problems = []
        for key in adapter.tensors:
            if adapter.tensors.dtype(key) not in FLOAT_DTYPES:
                continue
            array = np.asarray(adapter.tensors[key], dtype=np.float32)
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                problems.append(f"{path}: tensor {key!r}: {bad} non-finite value(s) (NaN/Inf)")
        return fmt, problems


__all__ = [
    "FORMAT_WHAT",
    "NEEDS_BASE",
    "NeedsBase",
    "check_adapter",
    "check_base_given",
    "identify_adapter",
    "open_adapter",
    "read_adapter",
]
