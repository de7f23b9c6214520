"""Merging adapters into a llama.cpp GGUF model file, streamed, with the survival report.

Each adapted tensor is dequantized exactly (gguf-py's codecs), brought into Hugging Face row order
(llama.cpp stores LLaMA's q/k rows permuted for its rotary layout), merged in float32 by the same
plan and arithmetic as a checkpoint merge, permuted back and requantized to its own type (or
``qtype``). Everything else is copied byte for byte: the header and every metadata KV entry, and
every tensor nothing changes. When every tensor keeps its type the output is the input with the
changed tensors' bytes replaced at the same offsets; when ``qtype`` changes a tensor's size, the
tensor-info table and data offsets are laid out again (KV section still verbatim).

A GGUF model has no config.json and llama.cpp's names: :func:`gguf_config` derives the few config
values the plugins need from the metadata, and :func:`gguf_layers` asks the plugin for the layer
behind each llama.cpp name. Those two are the only places that talk to the plugins.

The adapter's base fingerprint (of a Hugging Face checkpoint) cannot be compared with a GGUF
file, so it is not checked; shapes and names are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..architecture import CheckpointInfo, DenseLayer, PluginArchitecture, registry
from ..atomic import atomic_file, check_output
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ..interchange.experts import collect_stacks, expert_parts, expert_storage
from ..quant import ggml
from ..quant.survival import DEFAULT_THRESHOLD, SurvivalReport, measure
from .plan import TensorOp, open_adapters, plan_merge

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


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_config(reader: Any, arch_name: str) -> dict[str, Any]:
    """The Hugging Face config values the plugins need, from llama.cpp's metadata keys."""
    config: dict[str, Any] = {"model_type": arch_name}
    keys = {
        "num_attention_heads": "attention.head_count",
        "num_key_value_heads": "attention.head_count_kv",
        "hidden_size": "embedding_length",
        "head_dim": "attention.key_length",
        "num_hidden_layers": "block_count",
        "intermediate_size": "feed_forward_length",
        "vocab_size": "vocab_size",
    }
    for hf, key in keys.items():
        value = _field(reader, f"{arch_name}.{key}")
        if isinstance(value, (int, float)):
            config[hf] = int(value)
    return config


def gguf_layers(
    architecture: PluginArchitecture, config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, tuple[DenseLayer, str, np.ndarray | None]]:
    """Layer path → (layer, llama.cpp tensor name, row permutation llama.cpp applied or None)
    for every tensor of ``shapes`` (llama.cpp names, numpy shapes) the plugin names.

    GGUF stores every linear weight as ne [in, out], i.e. (out, in) here, and embedding tables as
    (vocab, dim), whatever the Hugging Face layout was.
    """
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        path = architecture.names.layer_path(name.removesuffix(".weight"), "gguf")
        if path is not None:
            found[path] = (name, shape)
    # The plugin reads shapes in its checkpoint's layout; a linear layer it stores [in, out]
    # (GPT-2's Conv1D) is [out, in] in GGUF, so ask again with those shapes turned back, so that
    # fused parts (rows of the output) come out right.
    shapes_hf = {p + ".weight": s for p, (_, s) in found.items()}
    for d in architecture.dense_layers(CheckpointInfo(None, config, shapes_hf)):
        if d.layout == "in_out" and d.kind == "linear":
            shapes_hf[d.weight] = tuple(reversed(shapes_hf[d.weight]))
    checkpoint = CheckpointInfo(None, config, shapes_hf)
    kinds = {d.path: d for d in architecture.dense_layers(checkpoint)}
    layers = {}
    for path, (name, shape) in found.items():
        plugin = kinds.get(path)
        if plugin is None:
            continue
        if plugin.kind == "embedding":
            dense = DenseLayer(path, shape[0], shape[1], "in_out", "embedding")
        else:
            dense = DenseLayer(path, shape[1], shape[0], "out_in", "linear", plugin.parts)
        perm = architecture.row_permutation(checkpoint, path, "gguf")
        if perm is not None:
            perm = np.asarray(perm, dtype=np.int64)
            if perm.shape != (dense.out_features,) or not np.array_equal(
                np.sort(perm), np.arange(dense.out_features)
            ):
                raise LoraformatError(
                    None, f"plugin gave an invalid gguf row permutation for {path}"
                )
        layers[path] = (dense, name, perm)
    return layers


def gguf_architecture(
    arch_name: str, where: Path, preferred: Sequence[str] = ()
) -> PluginArchitecture:
    """The installed architecture whose llama.cpp name (``gguf_architecture``) is ``arch_name``:
    of several sharing it (llama.cpp converts Mistral and Mixtral as ``llama``), the first of
    ``preferred`` (the adapters' architectures), else the one with that id, else the first."""
    found = [a for a in registry().architectures().values() if a.gguf_architecture == arch_name]
    if not found:
        raise LoraformatError(
            where, f"no installed plugin names the tensors of llama.cpp architecture "
            f"{arch_name!r}; cannot locate adapted layers",
        )
    for wanted in (*preferred, arch_name):
        match = next((a for a in found if a.id == wanted), None)
        if match is not None:
            return match
    return found[0]


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


def _open_reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors for a bad file
        raise LoraformatError(path, f"not a readable GGUF file ({exc})") from None


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
    op: TensorOp, tensor: Any, perm: np.ndarray | None, layout: str, where: Path, fd: int
) -> tuple[np.ndarray, np.ndarray]:
    """(W, W') as float32 in llama.cpp's row order."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    w = ggml.dequantize(_read(fd, tensor, where), tensor.tensor_type, shape, where)
    axis = 0 if layout == "out_in" else 1
    if perm is None:
        return w, op.apply(w)
    hf = np.empty_like(w)
    # llama.cpp stored rows W_hf[perm]; undo, merge in Hugging Face order, redo.
    if axis == 0:
        hf[perm] = w
    else:
        hf[:, perm] = w
    merged = op.apply(hf, inplace=True)
    return w, np.ascontiguousarray(np.take(merged, perm, axis=axis))


def _write_same_layout(base: Path, out: Path, changed: Mapping[str, object],
                       tensors: Mapping[str, Any], produce: Callable[[str], np.ndarray]) -> None:
    """Copy ``base`` to ``out`` (atomically), then overwrite each changed tensor's bytes in
    place, one tensor at a time."""
    with atomic_file(out) as handle:
        with open(base, "rb") as src:
            shutil.copyfileobj(src, handle, _COPY_CHUNK)
        handle.flush()
        for name in changed:
            data = produce(name)
            assert data.nbytes == tensors[name].n_bytes
            os.pwrite(handle.fileno(), memoryview(data), tensors[name].data_offset)


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _write_relayout(reader: Any, base: Path, out: Path, types: Mapping[str, Any],
                    produce: Callable[[str], np.ndarray]) -> None:
    """Write the KV section verbatim, a new tensor-info table (sizes follow from the types), and
    the data at the new offsets, producing each changed tensor when its turn comes."""
    import gguf

    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise LoraformatError(base, "a big-endian GGUF file cannot change tensor types here")
    alignment = int(reader.alignment)
    tensors = list(reader.tensors)
    kv_end = tensors[0].field.offset if tensors else reader.data_offset
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
        handle.write(src.read(kv_end))
        handle.write(bytes(infos))
        handle.write(b"\0" * _pad(kv_end + len(infos), alignment))
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
    reader = _open_reader(base_path)
    arch_name = _field(reader, "general.architecture")
    if not isinstance(arch_name, str):
        raise LoraformatError(base_path, "GGUF file has no general.architecture")
    if _field(reader, "general.type") == "adapter":
        raise LoraformatError(base_path, "is a GGUF adapter, not a model; merge needs a model")
    config = gguf_config(reader, arch_name)
    by_name = {t.name: t for t in reader.tensors}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    out_type = ggml.qtype(qtype, target) if qtype else None
    with contextlib.ExitStack() as stack:
        opened = open_adapters(stack, adapters)
        architecture = gguf_architecture(arch_name, base_path, [a.architecture for a in opened])
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
            w, merged = _merge_tensor(changed[name], tensor, perm, dense.layout, base_path, fd)
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

        if all(kind == by_name[name].tensor_type for name, kind in types.items()):
            _write_same_layout(base_path, target, changed, by_name, produce)
        else:
            _write_relayout(reader, base_path, target, types, produce)
    return GgufMergeResult(
        target, plan.layer_count, len(changed), {n: k.name for n, k in types.items()},
        report if report.layers else None,
    )


__all__ = ["GgufMergeResult", "expert_layers", "gguf_config", "gguf_layers",
           "in_llama_cpp_terms", "merge_gguf"]
