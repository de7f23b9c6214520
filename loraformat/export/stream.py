"""Streamed export: the graph is traced without weights, the weights are written one at a time.

A plain export would hold the model in memory several times (the merged tensors, the torch module,
the exporter's copies, the serialized proto). Here:

1. **The module is built without weights.** The plugin builds its export module as usual, but
   every parameter its constructors create goes to the meta device (:func:`weightless_parameters`)
   and the checkpoint tensors it is given are *placeholders*: one-element CPU tensors expanded to
   the checkpoint's shape (:func:`placeholder_tensors`; stride 0, so they hold 4 bytes each).
   ``load_state_dict(assign=True)`` puts the placeholders in. Buffers the module computes itself
   (rotary frequencies, position ids) are real, so tracing runs on the CPU as usual.
2. **The graph is exported** from that module exactly as before (same nodes and names: the
   exporter reads shapes and dtypes, never weight values, when constant folding is kept off the
   checkpoint tensors).
3. **The weights are attached lazily** (:func:`attach_weights`): each checkpoint-named
   initializer becomes an ``onnx_ir.LazyTensor`` that reads the tensor from the checkpoint's memory
   map, applies the merge plan's operation (fp32 accumulation in the base dtype, as a merged
   checkpoint holds it) and casts to the initializer's dtype. ``onnx_ir`` evaluates each one only
   while writing it into the external-data file, then drops it.

Peak memory is then the exporter's graph plus the largest tensor, whatever the depth; the output
is the same file an in-memory export writes (``tests/test_export_stream.py``).

4. **``--verify`` streams too** (:func:`weights_on_demand`): the torch reference forward runs on
   the same weightless module, and each torch call that uses a checkpoint tensor is given the
   merged tensor read for that call, released after it. The figures are those of a reference
   with every weight loaded (``tests/test_export_verify.py``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from ..checkpoint import Checkpoint
from ..errors import LoraformatError
from ..format.safetensors_io import DTYPES
from ..merge.plan import MergePlan

#: Above this many weight bytes a streamed export keeps its weights in an external data file, so
#: the .onnx protobuf (which is serialized whole, in memory) stays small.
STREAM_EXTERNAL_BYTES = 64 * 1024**2


#: Elements cast at a time by :func:`merged_array` (16 MiB of fp32).
CAST_BLOCK_ELEMENTS = 1 << 22


def _is_placeholder(tensor: Any) -> bool:
    return tensor.numel() > 1 and all(s == 0 for s in tensor.stride())


@contextlib.contextmanager
def weightless_parameters() -> Iterator[None]:
    """While active, a parameter registered on any ``nn.Module`` is replaced by a meta-device
    parameter of the same shape and dtype — unless it is a placeholder (stride 0), which is kept.

    Constructors still allocate each parameter briefly (``torch.zeros(shape)``), one at a time;
    nothing holds them. Buffers are untouched: modules compute them from the config.
    """
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: Any) -> None:
        if param is not None and not _is_placeholder(param):
            param = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False
            )
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def torch_dtype_for(stored: np.dtype | str, float_dtype: Any) -> Any:
    """The torch dtype a checkpoint tensor of numpy dtype ``stored`` gets in the export:
    ``float_dtype`` for floating tensors, its own dtype otherwise."""
    import torch

    dt = np.dtype(stored) if not isinstance(stored, np.dtype) else stored
    if dt.kind == "f" or dt.name == "bfloat16":
        return float_dtype
    return torch.from_numpy(np.zeros(1, dtype=dt)).dtype


def numpy_dtype(torch_dtype: Any) -> np.dtype:
    """The numpy dtype holding ``torch_dtype``'s values: ``ml_dtypes.bfloat16`` for bfloat16,
    which numpy (and so ``torch.Tensor.numpy``) does not know."""
    import torch

    if torch_dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return torch.empty(0, dtype=torch_dtype).numpy().dtype


def to_torch(array: np.ndarray) -> Any:
    """A torch tensor sharing ``array``'s memory; bfloat16 reinterpreted through int16."""
    import torch

    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def placeholder_tensors(checkpoint: Checkpoint, float_dtype: Any) -> dict[str, Any]:
    """Every checkpoint tensor as a stride-0 placeholder of its shape, in the export dtype."""
    import torch

    out = {}
    for name in checkpoint.names():
        info = checkpoint.info(name)
        dtype = torch_dtype_for(stored_dtype(checkpoint, name), float_dtype)
        out[name] = torch.zeros((), dtype=dtype).expand(tuple(info.shape))
    return out


def build_weightless(build: Callable[[], Any], tensors: Mapping[str, Any]) -> Any:
    """``build()`` (a plugin's export-module construction, returning an ExportModel) under
    :func:`weightless_parameters`.

    A plugin that copies the checkpoint tensors into its parameters (``load_state_dict`` without
    ``assign=True``) copies into meta tensors, which does nothing: such parameters are given
    their placeholder from ``tensors`` afterwards, by name (state-dict keys are checkpoint
    names). A meta parameter that is not a checkpoint tensor is a :class:`LoraformatError`.
    """
    import torch

    release_freed_buffers()  # before tracing: the exporter's own large temporaries too
    with weightless_parameters(), warnings.catch_warnings():
        # torch warns for each parameter such a plugin copies into a meta tensor
        warnings.filterwarnings("ignore", message=".*non-meta parameter.*meta parameter")
        exported = build()
    module = exported.module
    for name, param in list(module.named_parameters()):
        if not param.is_meta:
            continue
        if name not in tensors:
            raise LoraformatError(
                None, f"the export module's parameter {name} is not a checkpoint tensor"
            )
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        setattr(sub, attr, torch.nn.Parameter(tensors[name], requires_grad=False))
    return exported


def stored_dtype(checkpoint: Checkpoint, name: str) -> np.dtype:
    """The numpy dtype of a checkpoint tensor, from its header."""
    return DTYPES[checkpoint.info(name).dtype]


def _read_into(handle: Any, view: memoryview, path: Any, name: str) -> None:
    """Fill ``view`` from ``handle`` (``readinto`` may return less than asked)."""
    got = 0
    while got < len(view):
        n = handle.readinto(view[got:])
        if not n:
            raise LoraformatError(path, f"file ends inside tensor {name!r}")
        got += n


def read_tensor(checkpoint: Checkpoint, name: str) -> np.ndarray:
    """A private, writable copy of one checkpoint tensor, read with ``readinto``.

    Not through the memory map: mapped pages that were read count toward the process's resident
    set for as long as the mapping lives (the whole export), a read buffer only until dropped.
    """
    st = checkpoint.shard_file(checkpoint.shard_of[name])
    info = st.info(name)
    buffer = np.empty(info.nbytes, dtype=np.uint8)
    with open(st.path, "rb") as handle:
        handle.seek(st.data_start + info.begin)
        _read_into(handle, memoryview(buffer), st.path, name)
    return buffer.view(DTYPES[info.dtype]).reshape(info.shape)


def _cast(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``block`` in ``dtype``: floats through fp32 (see :func:`merged_array`)."""
    through_fp32 = block.dtype.kind == "f" or block.dtype.name == "bfloat16"
    return (block.astype(np.float32) if through_fp32 else block).astype(dtype)


def merged_array(
    checkpoint: Checkpoint, name: str, plan: MergePlan | None, dtype: np.dtype | None
) -> np.ndarray:
    """One tensor as the merged checkpoint holds it (plan applied in the base dtype), cast to
    ``dtype`` (through fp32, so bf16/f16/f64 sources convert exactly as torch would: fp32 →
    bf16 is ``ml_dtypes``' round-to-nearest-even, bit for bit torch's ``.to(torch.bfloat16)``;
    a tensor already in ``dtype`` is copied unchanged). The cast runs in blocks of
    :data:`CAST_BLOCK_ELEMENTS`, so a 1 GiB bf16 embedding table exported in fp16 costs its
    source and its result, not a 2 GiB fp32 copy besides."""
    value = read_tensor(checkpoint, name)
    op = plan.ops.get(name) if plan is not None else None
    if op is not None:
        value = op.apply(value, inplace=op.kind == "weight")
    if dtype is None or value.dtype == dtype:
        return np.ascontiguousarray(value)
    out = np.empty(value.shape, dtype)
    source, target = np.ascontiguousarray(value).reshape(-1), out.reshape(-1)
    for start in range(0, source.size, CAST_BLOCK_ELEMENTS):
        target[start:start + CAST_BLOCK_ELEMENTS] = _cast(
            source[start:start + CAST_BLOCK_ELEMENTS], dtype
        )
    return out


def copy_tensor(checkpoint: Checkpoint, name: str, dtype: np.dtype, out: Any) -> None:
    """Write one checkpoint tensor, unmerged, in ``dtype`` to the binary file ``out`` at its
    position: the bytes of ``merged_array(checkpoint, name, None, dtype)`` (little-endian, as
    ONNX external data holds them), without the tensor ever in memory. In its own dtype the
    kernel copies it (``copy_file_range``, where the platform has it); otherwise it is read,
    cast and written :data:`CAST_BLOCK_ELEMENTS` at a time — an 8B model's 1 GiB embedding
    table costs two blocks of memory."""
    st = checkpoint.shard_file(checkpoint.shard_of[name])
    info = st.info(name)
    source = np.dtype(DTYPES[info.dtype])
    start, left = st.data_start + info.begin, info.nbytes
    with open(st.path, "rb") as handle:
        if source == dtype and hasattr(os, "copy_file_range"):
            out.flush()
            position = out.tell()
            with contextlib.suppress(OSError):  # not on this filesystem: the rest is read below
                while left:
                    n = os.copy_file_range(handle.fileno(), out.fileno(), left,
                                           start + info.nbytes - left, position)
                    if not n:
                        raise OSError("copy_file_range copied nothing")
                    left -= n
                    position += n
            out.seek(position)
        handle.seek(start + info.nbytes - left)
        buffer = np.empty(min(left, CAST_BLOCK_ELEMENTS * source.itemsize), np.uint8)
        while left:
            view = memoryview(buffer)[:min(left, buffer.size)]
            _read_into(handle, view, st.path, name)
            left -= len(view)
            block = buffer[:len(view)].view(source)
            out.write(view if source == dtype else _cast(block, dtype).tobytes())


def release_freed_buffers() -> None:
    """Make glibc return every freed allocation of 1 MiB or more to the system at once.

    Streaming allocates and frees one tensor-sized buffer after another, in several sizes (read,
    cast, quantization temporaries). glibc raises its mmap threshold after the first such free
    (up to 32 MiB), so later buffers come from the heap, whose holes it does not give back: peak
    RSS then drifts between identical runs. A fixed threshold (``mallopt(M_MMAP_THRESHOLD,
    1 MiB)``, what ``MALLOC_MMAP_THRESHOLD_`` sets) keeps it flat (figures: README, "Why the
    design is as it is"). Process-wide and permanent; a no-op where libc is not glibc.
    """
    import ctypes
    import ctypes.util

    with contextlib.suppress(Exception):  # not glibc, or no libc to load: nothing to tune
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def attach_weights(
    model: Any,
    checkpoint: Checkpoint,
    plan: MergePlan | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Give every initializer of the onnx_ir ``model`` named after a checkpoint tensor a lazy
    value: the (merged) checkpoint tensor in the initializer's dtype, read when written.

    Returns the names attached. ``progress(done, total)`` is called as they are written.
    """
    import onnx_ir as ir

    names = [n for n in model.graph.initializers if n in checkpoint]
    total = len(names)
    written = [0]

    for name in names:
        value = model.graph.initializers[name]
        old = value.const_value
        dtype = old.dtype if old is not None else value.dtype
        shape = ir.Shape(list(checkpoint.info(name).shape))
        np_dtype = dtype.numpy()

        def make(name: str = name, np_dtype: np.dtype = np_dtype) -> Any:
            array = merged_array(checkpoint, name, plan, np_dtype)
            written[0] += 1
            if progress is not None:
                progress(min(written[0], total), total)
            return ir.Tensor(array, name=name)

        value.const_value = ir.LazyTensor(make, dtype=dtype, shape=shape, name=name)
    return names


def load_real_weights(
    module: Any,
    checkpoint: Checkpoint,
    plan: MergePlan | None,
    float_dtype: Any,
) -> None:
    """Replace ``module``'s placeholder/meta parameters by the (merged) checkpoint tensors, for a
    torch reference run (``--verify``)."""

    state = module.state_dict(keep_vars=True)
    real = {}
    for key in state:
        if key not in checkpoint:
            continue
        target = torch_dtype_for(stored_dtype(checkpoint, key), float_dtype)
        real[key] = to_torch(merged_array(checkpoint, key, plan, numpy_dtype(target)))
    module.load_state_dict(real, strict=False, assign=True)


#: Tensor attributes and methods that read only metadata, which a placeholder answers as the
#: real tensor would: the weight is not read for them. (``stride``/``is_contiguous`` are not here:
#: a placeholder's strides are 0, the real tensor's are not.)
_METADATA = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_leaf", "is_cuda",
    "is_meta", "is_sparse", "is_quantized", "is_nested", "names", "grad_fn", "grad", "_version",
    "size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "__len__",
})


@contextlib.contextmanager
def weights_on_demand(
    module: Any,
    checkpoint: Checkpoint,
    plan: MergePlan | None,
    float_dtype: Any,
) -> Iterator[None]:
    """While active, torch calls on ``module``'s checkpoint tensors (its placeholders) see the
    (merged) checkpoint tensor instead, read for that one call and released after it — the torch
    reference forward of ``--verify`` without the model's weights in memory all at once.

    A ``TorchFunctionMode`` substitutes the argument, not forward hooks on the owning module:
    a parameter is used wherever the plugin's code uses it, also outside its module's forward
    (a head tied to the embedding reads ``embed_tokens.weight`` in the root module's forward),
    and it is one mechanism for every plugin. The values are exactly what
    :func:`load_real_weights` would load (same reads, merge plan and dtype), so the reference's
    outputs are the same numbers; peak memory is the forward's activations plus the tensors of
    the op running (a view of a weight, such as ``W.T``, lives as long as the code holds it).
    A weight used by several ops is read for each (the embedding of a tied head twice).
    """
    import torch
    from torch.overrides import TorchFunctionMode

    names: dict[int, str] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if key in checkpoint and tensor is not None:
            names.setdefault(id(tensor), key)
    wanted = {
        key: numpy_dtype(torch_dtype_for(stored_dtype(checkpoint, key), float_dtype))
        for key in set(names.values())
    }

    def real(value: Any) -> Any:
        key = names.get(id(value)) if isinstance(value, torch.Tensor) else None
        if key is None:
            return value
        return to_torch(merged_array(checkpoint, key, plan, wanted[key]))

    def substitute(value: Any) -> Any:
        if type(value) in (list, tuple):  # torch.cat's list; not torch.Size, named tuples
            return type(value)(substitute(v) for v in value)
        return real(value)

    class OnDemand(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            attribute = getattr(getattr(func, "__self__", None), "__name__", None)
            own = getattr(func, "__name__", "")
            name = attribute if own == "__get__" else own
            if name not in _METADATA:
                args = substitute(args)
                kwargs = {k: substitute(v) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    with OnDemand():
        yield


__all__ = [
    "STREAM_EXTERNAL_BYTES",
    "attach_weights",
    "build_weightless",
    "load_real_weights",
    "merged_array",
    "numpy_dtype",
    "placeholder_tensors",
    "read_tensor",
    "release_freed_buffers",
    "stored_dtype",
    "to_torch",
    "torch_dtype_for",
    "weightless_parameters",
    "weights_on_demand",
]
