"""A small, strict, torch-free safetensors reader and streaming writer.

Why not only the ``safetensors`` package: loraformat must (1) inspect and validate without
importing torch, (2) report every structural problem as one line naming the file, (3) hash raw
tensor bytes independently of file layout, and (4) stream a merged checkpoint to disk one tensor at
a time. The container layout is the published safetensors one: an 8-byte little-endian header size
N, N bytes of UTF-8 JSON, then the byte buffer. Tests check parity with the ``safetensors`` package.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..atomic import atomic_file
from ..errors import LoraformatError

#: Largest JSON header accepted. The reference implementation uses the same bound.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Most tensors accepted in one file: far above any real checkpoint shard, far below a DoS.
MAX_TENSORS = 1_000_000
#: Tensor dimensions beyond this are refused before any arithmetic on them.
MAX_DIMS = 8

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_NUMPY_TO_ST = {dt: name for name, dt in DTYPES.items()}


def _refuse_constant(name: str) -> None:
    # Python's json accepts NaN/Infinity; JSON (RFC 8259) and the safetensors spec do not.
    raise ValueError(f"{name} is not valid JSON")


def unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object hook refusing duplicate member names.

    Parsers disagree on which duplicate wins, so a file with duplicates could mean one thing to
    the validator and another to the tool that applies it.
    """
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member {key!r}")
        result[key] = value
    return result


#: spec §9 (1.2): JSON nesting (arrays and objects, the outermost counting 1) and the length of
#: one number token, the same for every reader whatever its parser would take.
MAX_JSON_DEPTH = 64
MAX_NUMBER_CHARS = 4096
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_LONG_NUMBER = re.compile(rf"[-+0-9.eE]{{{MAX_NUMBER_CHARS + 1},}}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def json_limits_problem(text: str) -> str | None:
    """The first §9 limit ``text`` breaks (nesting depth, number length), checked on the text
    before parsing, in C-speed passes: strings removed, then brackets counted."""
    bare = _JSON_STRING.sub('""', text)
    if _LONG_NUMBER.search(bare):
        return f"a number is longer than {MAX_NUMBER_CHARS} characters"
    brackets = np.frombuffer(re.sub(r"[^\[\]{}]", "", bare).encode("ascii"), dtype=np.uint8)
    if brackets.size:
        steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
        if int(np.cumsum(steps).max()) > MAX_JSON_DEPTH:
            return f"nested too deeply (more than {MAX_JSON_DEPTH} levels)"
    return None


def _lone_surrogate(value: object) -> bool:
    """True when a string anywhere in ``value`` holds a surrogate code point (from a ``\\uD800``
    escape that no low surrogate follows): such a string has no UTF-8 form (spec §2)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def strict_json(text: str | bytes) -> object:
    """RFC 8259 JSON, strictly (spec §2, §9): no NaN/Infinity, no duplicate names, no byte order
    mark, no string without a UTF-8 form (lone surrogate escapes), nesting and number tokens
    within the limits. Any breach → ValueError naming it."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if text.startswith("\ufeff"):
        raise ValueError("starts with a byte order mark (U+FEFF)")
    limit = json_limits_problem(text)
    if limit:
        raise ValueError(limit)
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=unique_object)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(value):
        raise ValueError("a string holds a lone surrogate escape (\\uD800-\\uDFFF), which has no "
                         "UTF-8 form")
    return value


def dtype_name(array_dtype: np.dtype) -> str:
    """The safetensors dtype string of a numpy dtype (``float32`` → ``F32``)."""
    try:
        return _NUMPY_TO_ST[np.dtype(array_dtype).newbyteorder("<")]
    except KeyError:
        try:
            return _NUMPY_TO_ST[np.dtype(array_dtype)]
        except KeyError:
            raise ValueError(f"dtype {array_dtype} has no safetensors equivalent") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: dtype, shape and its byte range within the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def refuse_special_file(path: Path) -> None:
    """spec §1 (1.2): a FIFO, socket or device is refused before it is opened (opening a FIFO
    blocks until someone writes to it). A missing path is left to ``open``'s own message."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        what = "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise LoraformatError(path, f"is {what}; an adapter or checkpoint is a regular file")


class SafetensorsFile:
    """A memory-mapped safetensors file. Opening reads the header only.

    Tensor bytes are touched only when :meth:`numpy` or :meth:`raw` is called, so opening a
    thousand-tensor adapter costs one small read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        refuse_special_file(self.path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the mmap's lifetime
        except FileNotFoundError:
            raise LoraformatError(self.path, "file not found") from None
        except IsADirectoryError:
            raise LoraformatError(
                self.path, "is a directory, expected a .safetensors file"
            ) from None
        except OSError as exc:
            raise LoraformatError(self.path, f"cannot open: {exc.strerror}") from None
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise
        self._mmap: mmap.mmap | None = None

    # -- header -------------------------------------------------------------------------------
    def _fail(self, message: str) -> LoraformatError:
        return LoraformatError(self.path, message)

    def _parse_header(self) -> None:
        file_size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._fail(f"truncated safetensors file: {file_size} bytes, no header size")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > MAX_HEADER_BYTES:
            raise self._fail(
                f"safetensors header size {header_size} exceeds the {MAX_HEADER_BYTES}-byte limit"
            )
        if 8 + header_size > file_size:
            raise self._fail(
                f"truncated safetensors file: header claims {header_size} bytes, "
                f"file has {file_size - 8} after the size field"
            )
        raw = self._file.read(header_size)
        try:
            header = strict_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._fail(f"safetensors header is not valid UTF-8 JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("safetensors header is not a JSON object")
        # spec §1.1: the header is the JSON object from its first byte, padded only with spaces
        # (readers that skip other whitespace or leading bytes would disagree on hostile files).
        if not raw.startswith(b"{") or not raw.rstrip(b" ").endswith(b"}"):
            raise self._fail(
                "safetensors header must start with '{' and end with '}' followed only by spaces"
            )
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("safetensors __metadata__ must map strings to strings")
        if len(header) > MAX_TENSORS:
            raise self._fail(f"{len(header)} tensors exceed the {MAX_TENSORS}-tensor limit")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + header_size
        data_size = file_size - self.data_start
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            infos[name] = self._parse_entry(name, entry)
        expected = 0
        for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
            if info.begin != expected:
                what = "overlaps another tensor" if info.begin < expected else "leaves a hole"
                raise self._fail(f"tensor {name!r} {what} (data_offsets start at {info.begin})")
            expected = info.end
        if expected != data_size:
            if expected > data_size:
                raise self._fail(
                    f"truncated safetensors file: tensors need {expected} data bytes, "
                    f"file has {data_size}"
                )
            raise self._fail(f"{data_size - expected} unexpected trailing bytes after the tensors")
        self.tensors: dict[str, TensorInfo] = infos

    def _parse_entry(self, name: str, entry: object) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise self._fail(f"tensor {name!r}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise self._fail(
                f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end"
            )
        info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
        if info.numel * DTYPES[dtype].itemsize != info.nbytes:
            raise self._fail(
                f"tensor {name!r}: shape {list(shape)} of {dtype} needs "
                f"{info.numel * DTYPES[dtype].itemsize} bytes, data_offsets give {info.nbytes}"
            )
        return info

    # -- data ---------------------------------------------------------------------------------
    def _buffer(self) -> mmap.mmap | bytes:
        if self._mmap is None:
            if os.fstat(self._file.fileno()).st_size == 0:
                return b""
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._fail(f"no tensor named {name!r}") from None

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, zero-copy from the memory map."""
        info = self.info(name)
        start = self.data_start + info.begin
        return memoryview(self._buffer())[start : start + info.nbytes]

    def numpy(self, name: str) -> np.ndarray:
        """A read-only array viewing the memory map (no copy)."""
        info = self.info(name)
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=dtype)
        array = np.frombuffer(
            self._buffer(), dtype=dtype, count=info.numel, offset=self.data_start + info.begin
        )
        return array.reshape(info.shape)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def close(self) -> None:
        if self._mmap is not None:
            # An array may still view the map; it is then released with that array.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its bytes come from ``data`` (an array, or a callable giving one)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | Callable[[], np.ndarray | bytes | memoryview]

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> TensorEntry:
        return cls(name, dtype_name(array.dtype), tuple(array.shape), array)


def _tensor_bytes(entry: TensorEntry) -> bytes | memoryview:
    data = entry.data() if callable(entry.data) else entry.data
    if isinstance(data, np.ndarray):
        if dtype_name(data.dtype) != entry.dtype or tuple(data.shape) != entry.shape:
            raise ValueError(
                f"tensor {entry.name!r}: got {dtype_name(data.dtype)}{list(data.shape)}, "
                f"declared {entry.dtype}{list(entry.shape)}"
            )
        data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        # A flat uint8 view works for empty, 0-d and extension (bfloat16) arrays alike, where
        # memoryview.cast("B") does not.
        return memoryview(data.reshape(-1).view(np.uint8))
    return data


def _order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    # Wider dtypes first, then by name: every tensor starts aligned to its element size,
    # and the file is a pure function of its contents.
    return sorted(entries, key=lambda e: (-DTYPES[e.dtype].itemsize, e.name))


def build_header(entries: list[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for entry in entries:
        size = math.prod(entry.shape) * DTYPES[entry.dtype].itemsize
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return encoded + b" " * (-len(encoded) % 8)  # pad so the buffer starts 8-byte aligned


def write_safetensors(
    path: str | os.PathLike[str],
    entries: Iterable[TensorEntry] | Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> None:
    """Write tensors atomically, streaming: one tensor's bytes are held at a time.

    ``on_tensor`` is called after each tensor is written (progress reporting).
    """
    if isinstance(entries, Mapping):
        entries = [TensorEntry.of(name, array) for name, array in entries.items()]
    ordered = _order(entries)
    names = [e.name for e in ordered]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    header = build_header(ordered, metadata)
    with atomic_file(path) as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for entry in ordered:
            data = _tensor_bytes(entry)
            expected = math.prod(entry.shape) * DTYPES[entry.dtype].itemsize
            if len(data) != expected:
                raise ValueError(f"tensor {entry.name!r}: {len(data)} bytes, expected {expected}")
            handle.write(data)
            if on_tensor is not None:
                on_tensor(entry)


def read_header_only(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and metadata of a file, closing it straight after."""
    with SafetensorsFile(path) as st:
        return dict(st.tensors), dict(st.metadata)


