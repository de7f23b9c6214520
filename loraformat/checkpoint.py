"""Read a Hugging Face style checkpoint lazily: ``config.json`` plus one or many safetensors shards.

A checkpoint is a directory holding ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
shards with ``model.safetensors.index.json``; a bare ``.safetensors`` file works too (no config).
Nothing but headers is read until a tensor is asked for, and then through the memory map.

A checkpoint whose config says MXFP4 (published gpt-oss) is read through :class:`Mxfp4Checkpoint`
(:func:`open_checkpoint`): each stacked expert parameter stored as ``X_blocks``/``X_scales`` is
seen as the float parameter ``X``, dequantized when read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LoraformatError
from .format.safetensors_io import SafetensorsFile, TensorInfo
from .quant import mxfp4

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

#: Bytes hashed from each end of a tensor for the fingerprint (spec/FORMAT.md §Fingerprint).
FINGERPRINT_SAMPLE = 4096
FINGERPRINT_PREFIX = "lfp1:"


class Checkpoint:
    """Lazy, read-only view of a checkpoint's tensors across shards."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] = {}
        self.index_metadata: dict[str, Any] = {}
        self.shard_of: dict[str, str] = {}  # tensor name → shard file name
        self._files: dict[str, SafetensorsFile] = {}
        if self.path.is_dir():
            self._open_dir()
        elif self.path.is_file():
            self._open_file(self.path)
        else:
            raise LoraformatError(self.path, "base checkpoint not found")

    def _open_dir(self) -> None:
        config_path = self.path / CONFIG_FILE
        if config_path.is_file():
            try:
                self.config = json.loads(config_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise LoraformatError(config_path, f"not valid JSON ({exc})") from None
            if not isinstance(self.config, dict):
                raise LoraformatError(config_path, "config is not a JSON object")
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise LoraformatError(index_path, f"not valid JSON ({exc})") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise LoraformatError(
                    index_path, "not a safetensors index (no weight_map of name → shard file)"
                )
            self.index_metadata = index.get("metadata") or {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise LoraformatError(index_path, f"shard {shard!r} is outside the checkpoint")
                self._files[shard] = SafetensorsFile(self.path / shard)
            for name, shard in weight_map.items():
                if name not in self._files[shard]:
                    raise LoraformatError(
                        self.path / shard, f"index names tensor {name!r}, shard lacks it"
                    )
                self.shard_of[name] = shard
        elif (self.path / SINGLE_FILE).is_file():
            self._open_file(self.path / SINGLE_FILE)
        else:
            raise LoraformatError(self.path, f"no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint")

    def _open_file(self, file: Path) -> None:
        st = SafetensorsFile(file)
        self._files[file.name] = st
        for name in st:
            self.shard_of[name] = file.name

    # access --------------------------------------------------------------------------------
    @property
    def shards(self) -> list[str]:
        return list(self._files)

    def shard_file(self, shard: str) -> SafetensorsFile:
        return self._files[shard]

    def names(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, name: object) -> bool:
        return name in self.shard_of

    def info(self, name: str) -> TensorInfo:
        return self._file_of(name).info(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.info(name).shape for name in self.shard_of}

    def numpy(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor."""
        return self._file_of(name).numpy(name)

    def raw(self, name: str) -> memoryview:
        return self._file_of(name).raw(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.shard_of:
            yield name, self.numpy(name)

    def _file_of(self, name: str) -> SafetensorsFile:
        try:
            return self._files[self.shard_of[name]]
        except KeyError:
            raise LoraformatError(self.path, f"checkpoint has no tensor {name!r}") from None

    def fingerprint(self) -> str:
        return fingerprint(self)

    def close(self) -> None:
        for st in self._files.values():
            st.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Mxfp4Checkpoint(Checkpoint):
    """A checkpoint with MXFP4 parameters: ``shapes``, ``in``, ``info`` and ``numpy`` see each
    as its float32 parameter (dequantized on read, :mod:`loraformat.quant.mxfp4`) instead of its
    blocks and scales; ``names``, ``shard_file`` and ``raw`` still give the stored tensors, for
    writers that copy bytes. ``mxfp4``: parameter → its float shape."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self.mxfp4: dict[str, tuple[int, ...]] = {}
        stored = super().shapes()
        for name, shape in stored.items():
            if not name.endswith(mxfp4.BLOCKS_SUFFIX):
                continue
            stem = name.removesuffix(mxfp4.BLOCKS_SUFFIX)
            scales = stored.get(stem + mxfp4.SCALES_SUFFIX)
            if scales is None:
                raise LoraformatError(self.path, f"{name}: MXFP4 blocks without {stem}_scales")
            mxfp4.check_pair(tuple(shape), tuple(scales), self.path, stem)
            self.mxfp4[stem] = mxfp4.parameter_shape(tuple(shape))
        if not self.mxfp4:
            raise LoraformatError(self.path, "config says MXFP4, but no tensor is an MXFP4 "
                                  "X_blocks/X_scales pair")
        self.packed = {stem + suffix: stem for stem in self.mxfp4
                       for suffix in (mxfp4.BLOCKS_SUFFIX, mxfp4.SCALES_SUFFIX)}

    def __contains__(self, name: object) -> bool:
        return name in self.mxfp4 or (name not in self.packed and super().__contains__(name))

    def info(self, name: str) -> TensorInfo:
        if name in self.mxfp4:  # as if stored in float32 (no bytes of its own)
            return TensorInfo("F32", self.mxfp4[name], 0, 4 * int(np.prod(self.mxfp4[name])))
        return super().info(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {n: s for n, s in super().shapes().items() if n not in self.packed}
        return {**shapes, **self.mxfp4}

    def numpy(self, name: str) -> np.ndarray:
        if name in self.mxfp4:
            return mxfp4.dequantize(super().numpy(name + mxfp4.BLOCKS_SUFFIX),
                                    super().numpy(name + mxfp4.SCALES_SUFFIX))
        return super().numpy(name)


def is_mxfp4_config(config: Any) -> bool:
    """Whether a checkpoint's config says its experts are MXFP4."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "mxfp4"


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A :class:`Checkpoint`, or an :class:`Mxfp4Checkpoint` where its config says MXFP4."""
    checkpoint = Checkpoint(path)
    if not is_mxfp4_config(checkpoint.config):
        return checkpoint
    checkpoint.close()
    return Mxfp4Checkpoint(path)


def fingerprint(checkpoint: Checkpoint) -> str:
    """``lfp1:`` + sha256 over every tensor's name, dtype, shape and a byte sample.

    Exact definition (spec/FORMAT.md §Fingerprint): for each tensor in ascending UTF-8 byte order
    of its name, the line ``name TAB dtype TAB shape TAB sha256(sample) LF``, where shape is
    comma-separated decimals and sample is the whole data if it is at most 2·4096 bytes, else its
    first 4096 bytes followed by its last 4096. Independent of sharding; reads ~8 KiB per tensor.

    The samples are read with ``pread``, not through the memory map: a page fault on a mapped file
    maps in the kernel's whole read-around window, which then counts toward the process's resident
    set for as long as the checkpoint is open (README, "Why the design is as it is").
    """
    digest = hashlib.sha256()
    handles: dict[str, int] = {}
    try:
        for name in sorted(checkpoint.names(), key=lambda n: n.encode("utf-8")):
            info = checkpoint.info(name)
            st = checkpoint.shard_file(checkpoint.shard_of[name])
            fd = handles.get(str(st.path))
            if fd is None:
                fd = handles[str(st.path)] = os.open(st.path, os.O_RDONLY)
            begin, size = st.data_start + st.info(name).begin, st.info(name).nbytes
            if size > 2 * FINGERPRINT_SAMPLE:
                sample = _pread(fd, FINGERPRINT_SAMPLE, begin, st.path)
                sample += _pread(fd, FINGERPRINT_SAMPLE, begin + size - FINGERPRINT_SAMPLE, st.path)
            else:
                sample = _pread(fd, size, begin, st.path)
            shape = ",".join(str(d) for d in info.shape)
            line = f"{name}\t{info.dtype}\t{shape}\t{hashlib.sha256(sample).hexdigest()}\n"
            digest.update(line.encode("utf-8"))
    finally:
        for fd in handles.values():
            os.close(fd)
    return FINGERPRINT_PREFIX + digest.hexdigest()


def _pread(fd: int, size: int, offset: int, path: Path) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), offset + len(data))
        if not chunk:
            raise LoraformatError(path, "file ends inside a tensor")
        data += chunk
    return data
