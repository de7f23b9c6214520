"""What a file or directory is, by its content: every adapter format and every base kind.

One question, :func:`identify`, answered from magic bytes, headers and config files — never from
the extension alone, and never by reading more than a bounded header: a safetensors header is
read through the strict reader (size limit enforced before allocating), a GGUF header is walked
key by key with a byte budget, an ONNX model's top-level protobuf fields are walked by seeking,
and a pickle is only recognised, never loaded. Torch-free.

The answer carries a one-line description ("an ONNX Runtime adapter (.onnx_adapter)") so that a
file given where something else is expected is refused in the user's terms, not the reader's:
see :func:`require_base` here and :mod:`loraformat.interchange.front_door` for adapters.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import LoraformatError
from .format import manifest as mf
from .format.safetensors_io import MAX_HEADER_BYTES, read_header_only

ADAPTER = "adapter"
BASE = "base"
UNKNOWN = "unknown"

#: base kinds (``FileKind.format`` when ``role == BASE``)
CHECKPOINT = "checkpoint"  # a Hugging Face checkpoint directory
SAFETENSORS_MODEL = "safetensors"  # one .safetensors file of model weights
ONNX_MODEL = "onnx"
GGUF_MODEL = "gguf"

#: a pickled torch file: an adapter only if its tensors say so (loralib, PEFT's .bin)
PICKLE = "pickle"

#: the adapter formats :func:`identify` recognises itself (interchange format names); a codec
#: added to the interchange under another name is asked through its own ``sniff``.
ADAPTER_FORMATS = ("loraformat", "peft", "mlx", "gguf", "onnx_adapter", "loralib")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MLX_WEIGHTS = "adapters.safetensors"
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")

# GGUF header walk: how much of the key/value section may be read to find general.type.
_GGUF_BUDGET = 16 * 1024 * 1024
_GGUF_MAX_STRING = 1024 * 1024
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9

# ONNX ModelProto top-level fields: number → wire type (0 varint, 2 length-delimited).
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ONNX_GRAPH = 7
_ONNX_MAX_FIELDS = 4096


@dataclass(frozen=True)
class FileKind:
    """What a path is. ``role``: ``"adapter"``, ``"base"`` or ``"unknown"``; ``format``: the
    interchange format name for an adapter (``peft``, ``gguf``...), the base kind for a base
    (``checkpoint``, ``safetensors``, ``onnx``, ``gguf``), ``"pickle"`` or ``""`` otherwise;
    ``what``: one phrase for messages; ``read_path``: where a reader should start (a PEFT or MLX
    weights file given alone → its directory), ``None`` where the format cannot be read from
    this path alone (weights without their config)."""

    role: str
    format: str
    what: str
    read_path: Path | None

    @property
    def is_adapter(self) -> bool:
        return self.role == ADAPTER

    @property
    def is_base(self) -> bool:
        return self.role == BASE


def identify(path: str | os.PathLike[str]) -> FileKind:
    """What ``path`` is, by content. Raises :class:`LoraformatError` only if it does not exist or
    cannot be read at all."""
    path = Path(path)
    if path.is_dir():
        return _identify_dir(path)
    if not path.is_file():
        if not path.exists():
            raise LoraformatError(path, "no such file or directory")
        return FileKind(UNKNOWN, "", "not a regular file or directory", None)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
            return _identify_file(path, handle, head)
    except OSError as exc:
        raise LoraformatError(path, f"cannot read: {exc.strerror or exc}") from None


def describe(path: str | os.PathLike[str]) -> str:
    """One phrase saying what ``path`` is ("a llama.cpp GGUF model")."""
    return identify(path).what


def require_base(path: str | os.PathLike[str], accepted: tuple[str, ...] = (
    CHECKPOINT, SAFETENSORS_MODEL)) -> FileKind:
    """``path`` identified as a base of one of the ``accepted`` kinds, else one line naming what
    it is instead ("is an ONNX Runtime adapter (.onnx_adapter), not a model")."""
    path = Path(path)
    onnx = path.suffix == ".onnx" and ONNX_MODEL in accepted
    if not path.exists():
        raise LoraformatError(path, "ONNX model not found" if onnx else "base checkpoint not found")
    kind = identify(path)
    if kind.is_base and kind.format in accepted:
        return kind
    if kind.role == UNKNOWN and onnx and path.is_file():
        # content unrecognised but named .onnx: the ONNX reader says what is wrong with it
        return FileKind(BASE, ONNX_MODEL, "an ONNX model (.onnx)", path)
    names = [BASE_KIND_NAMES[k] for k in accepted]
    wanted = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if kind.is_base:
        raise LoraformatError(path, f"is {kind.what}; a base here must be {wanted}")
    raise LoraformatError(path, f"is {kind.what}, not a model; a base is {wanted}")


BASE_KIND_NAMES = {
    CHECKPOINT: "a checkpoint directory",
    SAFETENSORS_MODEL: "a .safetensors model",
    ONNX_MODEL: "an .onnx model",
    GGUF_MODEL: "a .gguf model",
}


# -- directories --------------------------------------------------------------------------------


def _json_object(path: Path) -> dict | None:
    try:
        if path.stat().st_size > MAX_HEADER_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _identify_dir(path: Path) -> FileKind:
    if (path / mf.MANIFEST_FILE).is_file():
        return FileKind(ADAPTER, "loraformat", "a loraformat adapter directory", path)
    config = _json_object(path / PEFT_CONFIG) if (path / PEFT_CONFIG).is_file() else None
    if config is not None and "peft_type" in config:
        kind = config.get("peft_type")
        what = "a PEFT adapter directory" if kind == "LORA" else f"a PEFT {kind} adapter directory"
        return FileKind(ADAPTER, "peft", what, path)
    if config is not None and (path / MLX_WEIGHTS).is_file() and (
        "lora_parameters" in config or "fine_tune_type" in config
    ):
        return FileKind(ADAPTER, "mlx", "an MLX-LM adapter directory", path)
    if any((path / name).is_file() for name in HF_WEIGHTS):
        return FileKind(BASE, CHECKPOINT, "a model checkpoint directory", path)
    if (path / HF_CONFIG).is_file() and (path / "pytorch_model.bin").is_file():
        return FileKind(UNKNOWN, "", "a checkpoint directory with pickled weights only "
                        "(pytorch_model.bin; loraformat reads safetensors checkpoints)", None)
    return FileKind(UNKNOWN, "", "a directory holding none of adapter.json, adapter_config.json, "
                    "adapters.safetensors, model.safetensors", None)


# -- files --------------------------------------------------------------------------------------


def _identify_file(path: Path, handle: BinaryIO, head: bytes) -> FileKind:
    if head[:4] == b"GGUF":
        return _identify_gguf(path, handle)
    if head[4:8] == b"TORT":  # flatbuffers file identifier of ONNX Runtime's adapter format
        return FileKind(ADAPTER, "onnx_adapter", "an ONNX Runtime adapter (.onnx_adapter)", path)
    if len(head) >= 9 and head[8:9] == b"{":
        size = struct.unpack("<Q", head[:8])[0]
        if 2 <= size <= os.fstat(handle.fileno()).st_size - 8:
            return _identify_safetensors(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / raw pickle
        return _pickle(path)
    if _looks_like_onnx(handle):
        return FileKind(BASE, ONNX_MODEL, "an ONNX model (.onnx)", path)
    if path.name == PEFT_CONFIG or path.name == HF_CONFIG:
        return FileKind(UNKNOWN, "", f"a {path.name} file (give the directory that holds it)",
                        None)
    return FileKind(UNKNOWN, "", "a file of no format loraformat knows (first bytes "
                    f"{head[:8].hex(' ') or 'none: empty file'})", None)


def _pickle(path: Path) -> FileKind:
    if path.name == PEFT_WEIGHTS[1]:
        return _weights_without_config(path, "peft", "PEFT adapter weights (adapter_model.bin)")
    return FileKind(UNKNOWN, PICKLE, "a pickled torch checkpoint (.pt/.bin)", path)


def _identify_safetensors(path: Path) -> FileKind:
    try:
        infos, metadata = read_header_only(path)
    except LoraformatError as exc:
        return FileKind(UNKNOWN, "", f"an unreadable safetensors file ({exc.message})", None)
    if mf.METADATA_KEY in metadata:
        return FileKind(ADAPTER, "loraformat", "a loraformat adapter (single .safetensors)", path)
    names = list(infos)
    if any(n.endswith((".lora_A.weight", ".lora_embedding_A")) for n in names):
        return _weights_without_config(
            path, "peft", "PEFT adapter weights (adapter_model.safetensors)"
        )
    if any(n.endswith(".lora_a") for n in names) and any(n.endswith(".lora_b") for n in names):
        return _weights_without_config(path, "mlx", "MLX-LM adapter weights (adapters.safetensors)")
    if any(n.endswith(".lora_A") for n in names):
        return FileKind(ADAPTER, "loralib", "a loralib (microsoft/LoRA) checkpoint", path)
    if names:
        return FileKind(BASE, SAFETENSORS_MODEL, "a model checkpoint (single .safetensors)", path)
    return FileKind(UNKNOWN, "", "an empty safetensors file (no tensors)", None)


def _weights_without_config(path: Path, fmt: str, what: str) -> FileKind:
    """A PEFT/MLX weights file: readable through its directory when the config is beside it."""
    parent = _identify_dir(path.parent)
    if parent.format == fmt:
        return FileKind(ADAPTER, fmt, what, path.parent)
    return FileKind(ADAPTER, fmt, what + f" without {PEFT_CONFIG} beside it", None)


def _identify_gguf(path: Path, handle: BinaryIO) -> FileKind:
    general_type = _gguf_general_type(handle)
    if general_type == "":
        return FileKind(UNKNOWN, "", "a GGUF file whose header cannot be read", None)
    if general_type == "adapter":
        return FileKind(ADAPTER, "gguf", "a llama.cpp GGUF LoRA adapter", path)
    if general_type is None or general_type == "model":
        return FileKind(BASE, GGUF_MODEL, "a llama.cpp GGUF model", path)
    return FileKind(UNKNOWN, "", f"a GGUF file of general.type {general_type!r}", None)


class _Budget:
    def __init__(self, handle: BinaryIO, limit: int) -> None:
        self.handle, self.left = handle, limit

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise ValueError("budget")
        data = self.handle.read(n)
        if len(data) != n:
            raise ValueError("truncated")
        self.left -= n
        return data

    def skip(self, n: int) -> None:
        self.handle.seek(n, os.SEEK_CUR)

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> bytes:
        n = self.u64()
        if n > _GGUF_MAX_STRING:
            raise ValueError("string")
        return self.read(n)


def _gguf_general_type(handle: BinaryIO) -> str | None:
    """``general.type`` of a GGUF (v2+) file, walking the key/values without loading tensors;
    ``None`` when absent (llama.cpp's own default: a model), ``""`` when the header is
    unreadable or exceeds the walk's budget."""
    handle.seek(4)
    reader = _Budget(handle, _GGUF_BUDGET)
    try:
        if reader.u32() < 2:
            return ""  # GGUF v1 (32-bit lengths) predates LoRA adapters in GGUF
        reader.u64()  # tensor count
        for _ in range(reader.u64()):
            key = reader.string()
            kind = reader.u32()
            if key == b"general.type" and kind == _GGUF_STRING:
                return reader.string().decode("utf-8", "replace")
            _gguf_skip(reader, kind)
    except (ValueError, struct.error, OSError):
        return ""
    return None


def _gguf_skip(reader: _Budget, kind: int) -> None:
    if kind == _GGUF_STRING:
        reader.skip(reader.u64())
    elif kind == _GGUF_ARRAY:
        item, count = reader.u32(), reader.u64()
        if item == _GGUF_STRING:
            for _ in range(count):  # each length read counts against the budget
                reader.skip(reader.u64())
        elif item in _GGUF_SIZES:
            reader.skip(count * _GGUF_SIZES[item])
        else:
            raise ValueError("array type")
    elif kind in _GGUF_SIZES:
        reader.skip(_GGUF_SIZES[kind])
    else:
        raise ValueError("value type")


def _varint(handle: BinaryIO) -> int | None:
    value = shift = 0
    for _ in range(10):
        byte = handle.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    return None


def _looks_like_onnx(handle: BinaryIO) -> bool:
    """An ONNX ModelProto: every top-level protobuf field is one of ModelProto's with its wire
    type, ``ir_version`` comes first, the fields end exactly at the end of the file, and there
    is a graph. Lengths are seeked over, never read."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    seen: set[int] = set()
    for index in range(_ONNX_MAX_FIELDS):
        position = handle.tell()
        if position == size:
            return _ONNX_GRAPH in seen
        tag = _varint(handle)
        if tag is None:
            return False
        number, wire = tag >> 3, tag & 7
        if _ONNX_FIELDS.get(number) != wire or (index == 0 and number != 1):
            return False
        value = _varint(handle)
        if value is None:
            return False
        if wire == 2:
            if handle.tell() + value > size:
                return False
            handle.seek(value, os.SEEK_CUR)
        seen.add(number)
    return _ONNX_GRAPH in seen


__all__ = [
    "ADAPTER",
    "ADAPTER_FORMATS",
    "BASE",
    "BASE_KIND_NAMES",
    "CHECKPOINT",
    "GGUF_MODEL",
    "ONNX_MODEL",
    "PICKLE",
    "SAFETENSORS_MODEL",
    "UNKNOWN",
    "FileKind",
    "describe",
    "identify",
    "require_base",
]
