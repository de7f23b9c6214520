"""Interchange: every foreign LoRA format converts to and from the loraformat :class:`Adapter`.

One mechanism for all formats: each is a *codec* object in its own module with

- ``name`` / ``description``, ``options`` (the extra keyword options it understands),
- ``sniff(path) -> bool``: does this path look like the format (cheap: headers, config files),
- ``read(path, ctx) -> Adapter`` and ``write(adapter, path, ctx) -> None`` (atomic output).

:func:`convert` = detect or take the source format, read into an :class:`Adapter` (the hub), write
the target. Anything the target cannot carry is refused with one line saying what, unless
``lossy=True``; the returned :class:`Report` lists representation changes (``notes``) and, with
``lossy``, what was changed or dropped (``lossy``).

=============  ==============================================================================
name           format
=============  ==============================================================================
loraformat     this project's adapter (directory or single ``.safetensors``)
peft           Hugging Face PEFT directory (adapter_config.json + adapter_model.safetensors/.bin)
loralib        microsoft/LoRA checkpoint (``.pt``/``.bin``/``.safetensors``), incl. MergedLinear
onnx_adapter   ONNX Runtime ``.onnx_adapter`` for a hot-swappable graph (loraformat export)
gguf           llama.cpp GGUF LoRA adapter
mlx            MLX-LM adapter directory (adapters.safetensors + adapter_config.json)
=============  ==============================================================================

Pickled torch files (PEFT's legacy ``adapter_model.bin``, loralib ``.pt``) are read only with
``torch.load(weights_only=True)``, which cannot execute code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..atomic import check_output
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ._common import Context, Progress, Report
from .formats import ALIASES, CODECS, NATIVE, SUFFIXES, codec, formats


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format name of an existing adapter file or directory, by content: the front door's
    identification (:func:`~loraformat.interchange.front_door.identify_adapter`), which refuses
    anything else in one line saying what it is."""
    from .front_door import identify_adapter

    return identify_adapter(path)[0]


def target_format(path: str | os.PathLike[str]) -> str:
    """The format an output path implies (by suffix); directories default to loraformat."""
    suffix = Path(path).suffix.lower()
    return SUFFIXES.get(suffix, "loraformat")


def _context(base: Any, lossy: bool, progress: Progress, options: dict[str, Any]) -> Context:
    from ..base import as_base

    return Context(base=as_base(base), allow_lossy=lossy, options=dict(options),
                   progress=progress)


def _check_options(fmt_codecs: list[Any], options: dict[str, Any]) -> None:
    known: set[str] = {"architecture"}
    for c in fmt_codecs:
        known |= set(getattr(c, "options", ()))
    for key, value in options.items():
        if value is not None and key not in known:
            names = ", ".join(c.name for c in fmt_codecs)
            raise LoraformatError(None, f"option {key!r} does not apply to {names}")


def to_adapter(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    base: Any = None,
    lossy: bool = False,
    progress: Progress = None,
    **options: Any,
) -> Adapter:
    """Read an adapter in any format (detected unless ``fmt``) as a loraformat :class:`Adapter`:
    :func:`~loraformat.interchange.front_door.read_adapter` without its report."""
    from .front_door import read_adapter

    return read_adapter(path, from_=fmt, base=base, lossy=lossy, progress=progress, **options)[0]


def open_adapter(
    path: str | os.PathLike[str] | Adapter, base: Any = None, *, lossy: bool = False,
    from_: str | None = None, **options: Any,
) -> Adapter:
    """An adapter in any format as a loraformat :class:`Adapter`, for the functions that take
    adapters (merge, export): the front door
    (:func:`~loraformat.interchange.front_door.open_adapter`). A loraformat adapter is loaded
    lazily as it is; another format (identified by content, or ``from_``) is converted, with
    ``base`` for its names and checks. The caller closes it."""
    from .front_door import open_adapter as front_door

    return front_door(path, from_=from_, base=base, lossy=lossy, **options)


def from_adapter(
    adapter: Adapter | str | os.PathLike[str],
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    base: Any = None,
    lossy: bool = False,
    overwrite: bool = False,
    progress: Progress = None,
    **options: Any,
) -> Report:
    """Write a loraformat adapter (object or path) in format ``fmt`` (default: by suffix)."""
    if not isinstance(adapter, Adapter):
        from ..format.adapter import load

        adapter = load(adapter)
    ctx = _context(base, lossy, progress, options)
    _check_options([codec(fmt or target_format(path))], ctx.options)
    return _write(adapter, Path(path), fmt, ctx, overwrite)


def _write(adapter: Adapter, path: Path, fmt: str | None, ctx: Context, overwrite: bool) -> Report:
    target = codec(fmt or target_format(path))
    check_output(path, overwrite)
    required = ctx.base.required_architecture if ctx.base is not None else None
    if required is not None and required != adapter.architecture:
        raise LoraformatError(
            ctx.base.path,
            f"base is {ctx.base.architecture!r} but the adapter is for {adapter.architecture!r}",
        )
    if ctx.base is not None:  # every target: never write a layer the base cannot take
        from .native import check_against_base

        try:
            check_against_base(adapter, ctx)
        except LoraformatError as exc:
            raise LoraformatError(exc.path or ctx.report.source or None, exc.message) from None
    ctx.report.target_format = target.name
    ctx.report.target = str(path)
    target.write(adapter, path, ctx)
    return ctx.report


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    from_: str | None = None,
    to: str | None = None,
    *,
    base: Any = None,
    lossy: bool = False,
    overwrite: bool = False,
    progress: Progress = None,
    **options: Any,
) -> Report:
    """Convert ``src`` (format ``from_`` or detected) to ``dst`` (format ``to`` or by suffix).

    ``base``: base checkpoint path or :class:`~loraformat.base.BaseModel`; needed where names or
    row order depend on the model config (GGUF) and used to check shapes everywhere.
    ``options``: codec options, e.g. ``alpha``/``rank``/``enable_lora`` for loralib,
    ``architecture`` when there is no base, ``dtype`` for ONNX Runtime adapters.
    Returns the :class:`Report`; raises :class:`LoraformatError` for bad input or a refused
    lossy conversion. ``src`` is never modified.
    """
    src_path, dst_path = Path(src), Path(dst)
    if src_path.exists() and dst_path.exists() and src_path.resolve() == dst_path.resolve():
        raise LoraformatError(dst_path, "output is the input; choose another output path")
    ctx = _context(base, lossy, progress, options)
    if from_ is None:  # by content; a PEFT/MLX weights file is read through its directory
        from .front_door import identify_adapter

        from_, src_path = identify_adapter(src_path)
    source = codec(from_)
    target = codec(to or target_format(dst_path))
    _check_options([source, target], ctx.options)
    ctx.report.source_format, ctx.report.source = source.name, str(src_path)
    if not src_path.exists():
        raise LoraformatError(src_path, "no such file or directory")
    check_output(dst_path, overwrite)
    adapter = source.read(src_path, ctx)
    try:
        return _write(adapter, dst_path, target.name, ctx, overwrite)
    finally:
        adapter.close()


__all__ = [
    "ALIASES",
    "CODECS",
    "NATIVE",
    "SUFFIXES",
    "Context",
    "Report",
    "codec",
    "convert",
    "detect_format",
    "formats",
    "from_adapter",
    "open_adapter",
    "target_format",
    "to_adapter",
]
