"""Streamed merge (and unmerge) of adapters into a Hugging Face safetensors checkpoint.

Each output shard is the input shard with the changed tensors' bytes replaced: the header is
copied but for ``__metadata__``'s record of the adapters merged in (:data:`~.plan.MERGED_KEY`; a
merged tensor keeps its dtype and shape, so every offset stays valid), tensors
nothing changes are copied by the kernel (``os.copy_file_range``, falling back to chunked
``pread``/``write``) without ever entering this process, and a changed tensor is read with
``pread`` into a pooled buffer, merged in place (fp32 accumulation, blockwise, no dense ΔW) and
written by a background thread while the next one is merged. Peak memory is therefore a few
copies of the largest *changed* tensor, whatever the model's size, and the base is never
memory-mapped beyond the fingerprint's samples. (Merging in place through a writable map of the
output was tried and was 4x slower on ext4: every first write to a page faults.)

The output directory holds the same shard files under the same names, the index, and every other
top-level file of the base (config, generation config, tokenizer) — except other weight formats
(``*.bin``, ``*.pt``, ``*.pth``, ``*.h5``, ``*.msgpack``, ``*.gguf``), which would be stale
unmerged copies. It is written atomically.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import TMP_MARKER, atomic_dir, check_output, default_mode, make_parents, remove_made
from ..base import BaseModel, open_base
from ..checkpoint import Checkpoint
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ..format.safetensors_io import DTYPES, SafetensorsFile, TensorInfo
from .plan import MERGED_KEY, MergePlan, TensorOp, open_adapters, plan_merge, read_merged
from .weights import accumulator_dtype

Progress = Callable[[int, int], None]

#: Weight files of other formats not carried into a merged checkpoint (they would be unmerged).
STALE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")
_CHUNK = 64 << 20
_IO_CHUNK = 128 << 10
_NO_RANGE_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    path: Path
    layers: int  # adapted layers
    tensors_changed: int
    shards: int

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.path),
            "tensors_changed": self.tensors_changed,
            "layers": self.layers,
            "shards": self.shards,
        }


def plan_for_base(
    base: BaseModel,
    adapters: Sequence[Adapter],
    *,
    weights: Sequence[float] | None = None,
    subtract: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> MergePlan:
    """:func:`~loraformat.merge.plan.plan_merge` with the base's layers and fingerprint."""
    specs = {path: spec for adapter in adapters for path, spec in adapter.specs.items()}
    return plan_merge(
        base.layers_for(specs),
        base.checkpoint.shapes(),
        adapters,
        architecture=base.required_architecture,
        base_path=base.path,
        weights=weights,
        subtract=subtract,
        fingerprint=base.checkpoint.fingerprint,
        force=force,
        allow_nonfinite=allow_nonfinite,
        merged=merged_in(base.checkpoint),
    )


def merged_in(checkpoint: Checkpoint) -> list[str]:
    """The adapters a checkpoint records as merged into it (:data:`~.plan.MERGED_KEY` in its
    first shard's ``__metadata__``; a merge writes it into every shard)."""
    st = checkpoint.shard_file(checkpoint.shards[0])
    return read_merged(st.metadata.get(MERGED_KEY), st.path)


def _header_with_record(st: SafetensorsFile, record: str) -> bytes:
    """``st``'s header (size field included) with ``__metadata__[MERGED_KEY] = record``, padded
    so the data stays 8-byte aligned; tensor offsets are relative to the data, so they hold."""
    with open(st.path, "rb") as handle:
        handle.seek(8)
        header = json.loads(handle.read(st.data_start - 8))
    header["__metadata__"] = {**header.get("__metadata__", {}), MERGED_KEY: record}
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


# -- low-level I/O ------------------------------------------------------------------------------


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # 128 KiB per call (README, "Why the design is as it is"): the source chunk stays in cache
    # while the kernel copies it.
    for start in range(0, len(data), _IO_CHUNK):
        chunk = data[start : start + _IO_CHUNK]
        at = offset + start
        while len(chunk):
            written = os.pwrite(fd, chunk, at)
            chunk, at = chunk[written:], at + written


def _read_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(buffer):
        n = os.preadv(fd, [buffer[got : got + _IO_CHUNK]], offset + got)
        if n <= 0:
            raise LoraformatError(path, "file ended early while reading a tensor")
        got += n


def _copy_range(src: int, dst: int, offset: int, count: int, path: Path, shift: int = 0) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``offset + shift`` of ``dst``."""
    fast = getattr(os, "copy_file_range", None)
    while count > 0 and fast is not None:
        try:
            n = fast(src, dst, min(count, 1 << 30), offset, offset + shift)
        except OSError as exc:
            if exc.errno in _NO_RANGE_COPY:
                break  # not supported here: fall back to plain reads and writes
            raise
        if n == 0:
            break
        offset += n
        count -= n
    while count > 0:
        chunk = os.pread(src, min(count, _CHUNK), offset)
        if not chunk:
            raise LoraformatError(path, "file ended early while copying a tensor")
        _pwrite_all(dst, memoryview(chunk), offset + shift)
        offset += len(chunk)
        count -= len(chunk)


class _Writer:
    """Writes byte ranges of one file on background threads.

    Every range goes to the offset it has in the input plus ``shift`` (the header's growth), so
    writes need no order and two threads copy into the page cache at once.
    The main thread merges the next tensor meanwhile (``pwrite``, ``copy_file_range`` and numpy's
    matmul all release the GIL): a merge costs about max(compute, I/O), not their sum. At most
    ``depth`` jobs wait; a written buffer goes back to a pool, so steady state allocates nothing
    (fresh pages cost a fault each).
    """

    def __init__(self, src: int, dst: int, path: Path, threads: int = 2, depth: int = 3,
                 shift: int = 0) -> None:
        self.src, self.dst, self.path, self.shift = src, dst, path, shift
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.free: dict[int, list[np.ndarray]] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._run, name=f"loraformat-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def buffer(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of ``nbytes`` (reused when one is free)."""
        with self.lock:
            free = self.free.get(nbytes)
            if free:
                return free.pop()
        return np.empty(nbytes, dtype=np.uint8)

    def release(self, data: np.ndarray) -> None:
        with self.lock:
            self.free.setdefault(data.nbytes, []).append(data)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread raises it
            try:
                if job[0] == "copy":
                    _copy_range(self.src, self.dst, job[1], job[2], self.path, self.shift)
                    continue
                _, data, offset, pooled = job
                offset += self.shift
                _pwrite_all(self.dst, memoryview(data), offset)
                # start writeback now (Linux: FADV_DONTNEED on dirty pages begins asynchronous
                # writeback), so the fsync that makes the output durable finds little left
                # (README, "Why the design is as it is").
                with contextlib.suppress(OSError, AttributeError):
                    os.posix_fadvise(self.dst, offset, data.nbytes, os.POSIX_FADV_DONTNEED)
                if pooled:
                    self.release(data)
            except BaseException as exc:
                self.error = exc

    def copy(self, offset: int, count: int) -> None:
        self._put(("copy", offset, count))

    def write(self, data: np.ndarray, offset: int, pooled: bool) -> None:
        self._put(("data", data, offset, pooled))

    def _put(self, job: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        if self.error is not None:
            raise self.error


def _merge_from_map(fd: int, offset: int, info: TensorInfo, op: TensorOp, out: np.ndarray) -> bool:
    """Merge a float32/float64 weight straight from a read-only map of its bytes in the input into
    ``out`` (the read fused into the add: each weight byte is touched once). The map covers only
    this tensor, is populated in one call, and is closed at once, so its pages leave this
    process's RSS. False when this path does not apply or the map cannot be made."""
    dtype = DTYPES[info.dtype]
    if op.kind != "weight" or info.nbytes == 0 or dtype != accumulator_dtype(dtype):
        return False
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    try:
        region = mmap.mmap(fd, info.nbytes + offset - start, flags=flags, prot=mmap.PROT_READ,
                           offset=start)
    except (OSError, ValueError):
        return False
    try:
        source = np.frombuffer(region, dtype=dtype, count=info.numel, offset=offset - start)
        op.apply(source.reshape(info.shape), out=out)
        del source
    finally:
        region.close()
    return True


def write_merged_shard(
    st: SafetensorsFile,
    out_fd: int,
    plan: MergePlan,
    on_op: Callable[[], None] | None = None,
) -> None:
    """Write ``st`` with ``plan`` applied to the open, empty file ``out_fd``.

    The header is copied with the plan's record of merged adapters in ``__metadata__`` (a merged
    tensor keeps its dtype and shape, so every offset stays valid); an unchanged tensor is copied
    by the kernel; a changed fp32/fp64 weight is merged from a short-lived read-only map of the
    input into a pooled buffer; any other changed tensor is read into a pooled buffer and merged
    there. The writer thread writes the buffer.
    """
    with open(st.path, "rb", buffering=0) as src:
        fd = src.fileno()
        header = _header_with_record(st, plan.merged_record)
        _pwrite_all(out_fd, memoryview(header), 0)
        writer = _Writer(fd, out_fd, st.path, shift=len(header) - st.data_start)
        try:
            for name, info in sorted(st.tensors.items(), key=lambda item: item[1].begin):
                op = plan.ops.get(name)
                if op is None:
                    writer.copy(st.data_start + info.begin, info.nbytes)
                    continue
                raw = writer.buffer(info.nbytes)
                value = raw.view(DTYPES[info.dtype]).reshape(info.shape)
                offset = st.data_start + info.begin
                if _merge_from_map(fd, offset, info, op, value):
                    writer.write(raw, offset, pooled=True)
                    del value
                    if on_op is not None:
                        on_op()
                    continue
                if info.nbytes:
                    _read_into(fd, memoryview(raw), offset, st.path)
                merged = op.apply(value, inplace=True)
                if merged.dtype != value.dtype or merged.shape != value.shape:
                    raise AssertionError(f"merge changed {name}'s dtype or shape")  # a bug
                if merged is value:
                    writer.write(raw, offset, pooled=True)
                else:
                    data = np.ascontiguousarray(merged).reshape(-1).view(np.uint8)
                    writer.write(data, offset, pooled=False)
                    writer.release(raw)
                del value, merged
                if on_op is not None:
                    on_op()
        finally:
            writer.close()


@contextlib.contextmanager
def _atomic_rw_file(path: Path) -> Iterator[int]:
    """Like :func:`loraformat.atomic.atomic_file`, yielding a raw descriptor: a temporary
    sibling, fsynced and renamed into place on success."""
    made = make_parents(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_MARKER, suffix="-" + path.name, dir=path.parent)
    try:
        yield fd
        os.fchmod(fd, default_mode(False))  # mkstemp's 0600 → what open() would give
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        remove_made(made)
        raise


def _copy_side_files(base_dir: Path, out_dir: Path, shards: set[str]) -> None:
    for item in sorted(base_dir.iterdir()):
        name = item.name
        if name in shards or name.startswith(TMP_MARKER) or name.endswith(STALE_WEIGHT_SUFFIXES):
            continue
        if item.is_dir():
            shutil.copytree(item, out_dir / name, symlinks=False)
        elif item.is_file():
            shutil.copy2(item, out_dir / name)


def merge_into_checkpoint(
    base: BaseModel,
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Stream ``base`` with ``plan`` applied to ``out`` (a directory, or a ``.safetensors`` file
    when the base is one file). Atomic: ``out`` is complete or absent."""
    target = check_output(out, overwrite)
    checkpoint = base.checkpoint
    if target.resolve() == checkpoint.path.resolve():
        raise LoraformatError(target, "output is the base itself; inputs are never modified")
    total, done = len(plan.ops), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    if target.suffix == ".safetensors":
        if len(checkpoint.shards) != 1:
            raise LoraformatError(
                target, f"the base has {len(checkpoint.shards)} shards; write a directory instead"
            )
        with _atomic_rw_file(target) as fd:
            write_merged_shard(checkpoint.shard_file(checkpoint.shards[0]), fd, plan, step)
        return MergeResult(target, plan.layer_count, total, 1)
    with atomic_dir(target) as tmp:
        for shard in checkpoint.shards:
            with open(tmp / shard, "wb", buffering=0) as handle:
                write_merged_shard(checkpoint.shard_file(shard), handle.fileno(), plan, step)
        if checkpoint.path.is_dir():
            _copy_side_files(checkpoint.path, tmp, set(checkpoint.shards))
    return MergeResult(target, plan.layer_count, total, len(checkpoint.shards))


def merge_checkpoint(
    base: str | os.PathLike[str] | BaseModel,
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    subtract: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge ``adapters`` (weighted) into the checkpoint ``base`` and write it to ``out``.

    W' = W + Σ wᵢ·scaleᵢ·BᵢAᵢ in the base's layout and dtype (fp32 accumulation);
    ``subtract=True`` is ``unmerge``: W' = W − Σ wᵢ·scaleᵢ·BᵢAᵢ, where ``base`` is a merged model,
    so an adapter's base fingerprint is not checked. All refusals happen before anything is
    written (see :func:`~loraformat.merge.plan.plan_merge`).
    """
    with contextlib.ExitStack() as stack:
        model = base if isinstance(base, BaseModel) else stack.enter_context(open_base(base))
        opened = open_adapters(stack, adapters)
        plan = plan_for_base(
            model, opened, weights=weights, subtract=subtract, force=force,
            allow_nonfinite=allow_nonfinite,
        )
        return merge_into_checkpoint(model, plan, out, overwrite=overwrite, progress=progress)


def unmerge_checkpoint(
    base: str | os.PathLike[str] | BaseModel,
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    **kwargs: object,
) -> MergeResult:
    """:func:`merge_checkpoint` with ``subtract=True``."""
    return merge_checkpoint(base, adapters, out, subtract=True, **kwargs)  # type: ignore[arg-type]


__all__ = [
    "STALE_WEIGHT_SUFFIXES",
    "MergeResult",
    "merge_checkpoint",
    "merge_into_checkpoint",
    "merged_in",
    "plan_for_base",
    "unmerge_checkpoint",
    "write_merged_shard",
]
