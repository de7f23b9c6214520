"""Merging adapters into a llama.cpp GGUF model file, streamed, with the survival report.

Each adapted tensor is dequantized exactly (gguf-py's codecs), brought into Hugging Face row order
(llama.cpp stores LLaMA's q/k rows permuted for its rotary layout), merged in float32 by the same
plan and arithmetic as a checkpoint merge, permuted back and requantized to its own type (or
``qtype``). Everything else is copied byte for byte: the header and every metadata KV entry, and
every tensor nothing changes. When every tensor keeps its type the output is the input with the
changed tensors' bytes replaced at the same offsets; when ``qtype`` changes a tensor's size, the
tensor-info table and data offsets are laid out again (KV section still verbatim).

A GGUF model has no config.json and llama.cpp's names: :mod:`loraformat.gguf_model` derives the
few config values the plugins need from the metadata, picks the plugin written as the file's
llama.cpp architecture (the adapters' own where several are, as Mistral is written as ``llama``)
and asks it for the layer behind each llama.cpp name.

The adapter's base fingerprint (of a Hugging Face checkpoint) cannot be compared with a GGUF
file, so it is not checked; shapes and names are.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..architecture import CheckpointInfo, DenseLayer
from ..atomic import atomic_file, check_output
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ..gguf_model import (
    column_permutation,
    gguf_architecture,
    gguf_config,
    gguf_layers,
    model_architecture,
    open_reader,
    read_field,
)
from ..interchange.experts import collect_stacks, expert_parts, expert_storage
from ..quant import ggml
from ..quant.survival import DEFAULT_THRESHOLD, SurvivalReport, measure
from .plan import MERGED_KEY, TensorOp, open_adapters, plan_merge, read_merged

Progress = Callable[[int, int], None]
ADVICE = (
    "keep the adapter separate (llama.cpp --lora adapter.gguf, from `loraformat convert ADAPTER "
    "-o adapter.gguf --base BASE`) or merge into a finer type (--type Q8_0 or F16)"
)
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class GgufMergeResult:
    """What a GGUF merge wrote."""

    path: Path
    layers: int
    tensors_changed: int
    types: dict[str, str]  # changed tensor → the type written
    survival: SurvivalReport | None  # None when every changed tensor was written as F32

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "output": str(self.path),
            "tensors_changed": self.tensors_changed,
            "layers": self.layers,
            "types": dict(self.types),
        }
        if self.survival is not None:
            data["survival"] = self.survival.to_json()
        return data


def expert_layers(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, DenseLayer]:
    """llama.cpp's stacked expert weights (``blk.N.ffn_*_exps.weight``, numpy [E, out, in]) as
    expert layers keyed by their tensor name."""
    return {
        name: DenseLayer(name, shape[2], shape[1], experts=shape[0])
        for name, shape in shapes.items()
        if len(shape) == 3 and name.endswith("_exps.weight")
    }


def in_llama_cpp_terms(adapter: Adapter) -> Adapter:
    """``adapter`` with its expert layers as llama.cpp holds them: one expert layer per stacked
    tensor (``blk.N.ffn_gate_exps.weight`` …), per-expert layers stacked and gate/up split as the
    family's storage says (the same parts the GGUF adapter writer writes); other layers as
    they are. Unchanged when it has no expert layers."""
    stacks, used = collect_stacks(adapter, expert_storage(adapter.architecture))
    if not stacks:
        return adapter
    layers = {p: layer for p, layer in adapter.layers() if p not in used}
    for stack in stacks:
        parts = expert_parts(stack)
        if not parts:
            raise LoraformatError(
                adapter.path, f"{stack.name}: the {adapter.architecture!r} plugin gives no "
                "llama.cpp tensor for this expert parameter",
            )
        for name, rows in parts:
            b = np.ascontiguousarray(stack.B[:, rows])
            layers[name] = LoraLayer(A=stack.A, B=b, alpha=stack.alpha,
                                     in_features=stack.A.shape[2], out_features=b.shape[1],
                                     experts=stack.A.shape[0])
    replacements = {n: adapter.replacement(n) for n in adapter.replacement_names}
    converted = Adapter.from_layers(adapter.architecture, layers, scaling=adapter.scaling,
                                    replacements=replacements or None)
    converted.path = adapter.path
    return converted


def _read(fd: int, tensor: Any, where: Path) -> np.ndarray:
    """A tensor's bytes, read (not mapped): the reader's memory map would leave every merged
    tensor's pages resident, so peak RSS would grow with the model."""
    data = bytearray(tensor.n_bytes)
    view, got = memoryview(data), 0
    while got < len(data):
        n = os.preadv(fd, [view[got:]], tensor.data_offset + got)
        if n <= 0:
            raise LoraformatError(where, "file ended early while reading a tensor")
        got += n
    return np.frombuffer(data, dtype=np.uint8)


def _merge_tensor(
    op: TensorOp, tensor: Any, perm: np.ndarray | None, layout: str, where: Path, fd: int,
    columns: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(W, W') as float32 in llama.cpp's row (and input-column) order."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    w = ggml.dequantize(_read(fd, tensor, where), tensor.tensor_type, shape, where)
    if perm is None and columns is None:
        return w, op.apply(w)
    # llama.cpp stored W_hf[perm] (rows, the out axis) and W_hf[:, columns] (inputs); undo,
    # merge in Hugging Face order, redo.
    out_axis = 0 if layout == "out_in" else 1
    hf = w
    for order, axis in ((perm, out_axis), (columns, 1 - out_axis)):
        if order is not None:
            undone = np.empty_like(hf)
            undone[(slice(None),) * axis + (order,)] = hf
            hf = undone
    merged = op.apply(hf, inplace=True)
    for order, axis in ((perm, out_axis), (columns, 1 - out_axis)):
        if order is not None:
            merged = np.take(merged, order, axis=axis)
    return w, np.ascontiguousarray(merged)


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _key_values(reader: Any, strings: Mapping[str, str]) -> bytes:
    """The header up to the tensor infos: the base's key-values verbatim but those in
    ``strings``, which are (re)written as string values at the end."""
    import gguf

    kept = [f for name, f in reader.fields.items()
            if not name.startswith("GGUF.") and name not in strings]
    head = bytearray(reader.data[:8].tobytes())  # magic, version
    head += struct.pack("<QQ", len(reader.tensors), len(kept) + len(strings))
    for f in kept:
        head += reader.data[f.offset : f.offset + sum(p.nbytes for p in f.parts)].tobytes()
    for key, value in strings.items():
        name = key.encode("utf-8")
        head += struct.pack("<Q", len(name)) + name
        encoded = value.encode("utf-8")
        head += struct.pack("<IQ", int(gguf.GGUFValueType.STRING), len(encoded)) + encoded
    return bytes(head)


def _write_relayout(reader: Any, base: Path, out: Path, types: Mapping[str, Any],
                    produce: Callable[[str], np.ndarray], strings: Mapping[str, str]) -> None:
    """Write the key-values (``strings`` set), a new tensor-info table (sizes follow from the
    types), and the data at the new offsets, producing each changed tensor when its turn comes."""
    import gguf

    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise LoraformatError(base, "a big-endian GGUF file cannot be rewritten here")
    alignment = int(reader.alignment)
    tensors = list(reader.tensors)
    head = _key_values(reader, strings)
    infos = bytearray()
    offset = 0
    for t in tensors:
        kind = types.get(t.name, t.tensor_type)
        dims = [int(d) for d in t.shape.tolist()]
        size = ggml.nbytes(kind, list(reversed(dims))) if t.name in types else t.n_bytes
        encoded = t.name.encode("utf-8")
        infos += struct.pack("<Q", len(encoded)) + encoded + struct.pack("<I", len(dims))
        infos += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", int(kind), offset)
        offset += size + _pad(size, alignment)
    with atomic_file(out) as handle, open(base, "rb") as src:
        handle.write(head)
        handle.write(bytes(infos))
        handle.write(b"\0" * _pad(len(head) + len(infos), alignment))
        for t in tensors:
            if t.name in types:
                data = produce(t.name)
                handle.write(memoryview(data))
                size = data.nbytes
            else:
                src.seek(t.data_offset)
                left = size = t.n_bytes
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise LoraformatError(base, "file ended early while copying a tensor")
                    handle.write(chunk)
                    left -= len(chunk)
            handle.write(b"\0" * _pad(size, alignment))


def merge_gguf(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    qtype: str | None = None,
    threshold: float | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> GgufMergeResult:
    """Merge ``adapters`` into the GGUF model ``base``, writing ``out`` (atomic, streamed).

    ``qtype``: the GGUF type adapted tensors are written in (default: each keeps its own; k-quant
    outputs are refused with the types that can be written). ``threshold``: the survival share
    below which a layer is named in the report's warning. ``force`` is accepted for symmetry with
    the checkpoint merge; a GGUF base has no comparable fingerprint.
    """
    base_path = Path(base)
    target = check_output(out, overwrite)
    if target.resolve() == base_path.resolve():
        raise LoraformatError(target, "output is the base itself; inputs are never modified")
    reader = open_reader(base_path)
    arch_name = model_architecture(reader, base_path)
    by_name = {t.name: t for t in reader.tensors}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    out_type = ggml.qtype(qtype, target) if qtype else None
    with contextlib.ExitStack() as stack:
        opened = open_adapters(stack, adapters)
        # The plugin the adapters are for, if it is written as the file's llama.cpp architecture
        # (a Mistral adapter into a GGUF llama.cpp calls "llama").
        wanted = {a.architecture for a in opened}
        architecture = gguf_architecture(
            arch_name, base_path, wanted.pop() if len(wanted) == 1 else None
        )
        config = gguf_config(reader, arch_name)
        info = CheckpointInfo(base_path, config, {})
        try:
            layers = gguf_layers(architecture, config, shapes)
        except LoraformatError as exc:
            raise LoraformatError(
                base_path, f"llama.cpp architecture {arch_name!r}: {exc.message}"
            ) from None
        layers.update({p: (d, p, None) for p, d in expert_layers(shapes).items()})
        if not layers:
            raise LoraformatError(
                base_path, f"no installed plugin names the tensors of llama.cpp architecture "
                f"{arch_name!r}; cannot locate adapted layers",
            )
        opened = [in_llama_cpp_terms(a) for a in opened]
        plan = plan_merge(
            {p: d for p, (d, _, _) in layers.items()},
            {d.weight: d.stored_shape() for d, _, _ in layers.values()},
            opened, architecture=architecture.id, base_path=base_path, weights=weights,
            fingerprint=None, force=force, allow_nonfinite=allow_nonfinite,
            merged=read_merged(read_field(reader, MERGED_KEY), base_path),
        )
        by_weight = {d.weight: (d, name, perm) for d, name, perm in layers.values()}
        for op in plan.ops.values():
            if op.kind != "weight":
                raise LoraformatError(
                    base_path, f"{op.name}: a GGUF merge carries only low-rank updates (no "
                    "lora_bias or replaced tensors)",
                )
            _, name, _ = by_weight[op.name]
            tensor = by_name[name]
            ggml.check_writable(out_type or tensor.tensor_type, shapes[name], base_path, name)
        report = SurvivalReport(
            threshold=DEFAULT_THRESHOLD if threshold is None else threshold, advice=ADVICE
        )
        changed: dict[str, TensorOp] = {by_weight[w][1]: op for w, op in plan.ops.items()}
        types = {name: out_type or by_name[name].tensor_type for name in changed}
        total, done = len(changed), 0
        if progress is not None:
            progress(0, total)
        fd = os.open(base_path, os.O_RDONLY)
        stack.callback(os.close, fd)

        def produce(name: str) -> np.ndarray:
            """The new bytes of one changed tensor (merged, requantized, measured)."""
            nonlocal done
            dense, _, perm = by_weight[changed[name].name]
            tensor, kind = by_name[name], types[name]
            columns = column_permutation(architecture, info, dense.path, dense.in_features)
            w, merged = _merge_tensor(changed[name], tensor, perm, dense.layout, base_path, fd,
                                      columns)
            if kind.name == "F32":  # stored exactly: nothing to measure
                data = ggml.quantize(merged, kind, base_path)
            else:
                figures, data = measure(
                    name, w, merged,
                    lambda x: ggml.quantize(x, kind, base_path),
                    lambda q: ggml.dequantize(q, kind, w.shape, base_path),
                    qtype=kind.name, stored=w if kind == tensor.tensor_type else None,
                )
                report.add(figures)
            done += 1
            if progress is not None:
                progress(done, total)
            return data

        _write_relayout(reader, base_path, target, types, produce,
                        {MERGED_KEY: plan.merged_record})
    return GgufMergeResult(
        target, plan.layer_count, len(changed), {n: k.name for n, k in types.items()},
        report if report.layers else None,
    )


__all__ = ["GgufMergeResult", "expert_layers", "in_llama_cpp_terms", "merge_gguf"]
