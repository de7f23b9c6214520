"""ONNX Runtime adapters (``.onnx_adapter``) for a hot-swappable LoRA-slot graph.

Parameter names equal the graph inputs that ``loraformat export --lora-slots`` creates
(:mod:`loraformat.export.slots`, :mod:`loraformat.runtime`): for layer path ``P``,
``P.lora_A`` = Aᵀ ([in, r]) and ``P.lora_B`` = (scale·B)ᵀ ([r, out]) — Olive's orientation, the
scale folded into B (computed in float32, or float64 for float64 tensors), B's rows placed at
``out_rows`` with zeros elsewhere since a slot always spans every output row. Activated with
``RunOptions.add_active_adapter``, the graph then computes y = x·Wᵀ + x·A_s·B_s.

What a slot cannot carry — DoRA magnitudes, lora_bias, embedding LoRA, replaced tensors — is
refused, or dropped with ``lossy``. Reading back gives scale 1 (alpha = rank with ``alpha/r``):
bitwise the original tensors when the original scale was 1, the same ΔW up to one rounding of
scale·B otherwise. ONNX Runtime does not cast: ``dtype`` must match the graph's slots (default:
the adapter's own float32/float16/float64; bfloat16 becomes float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ..onnx_io import SLOT_A, SLOT_B
from ._common import Context, adapter_architecture, atomic_path, scaled

NAME = "onnx_adapter"
SUFFIX = ".onnx_adapter"
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
           "fp32": np.float32, "fp16": np.float16}


def _ort() -> Any:
    import onnxruntime

    if not hasattr(onnxruntime, "AdapterFormat"):
        raise LoraformatError(None, "this onnxruntime has no AdapterFormat (need ≥ 1.20)")
    return onnxruntime


def adapter_arrays(
    adapter: Adapter, ctx: Context, where: Path | None = None
) -> dict[str, np.ndarray]:
    """The adapter's parameters in the slot convention, keyed by graph input name."""
    wanted = ctx.options.get("dtype")
    if wanted is not None and str(wanted) not in _DTYPES:
        raise LoraformatError(where, f"dtype {wanted!r} is not one of float32, float16, float64")
    if adapter.replacement_names:
        ctx.lossy(
            f"{len(adapter.replacement_names)} replaced tensor(s) (e.g. "
            f"{adapter.replacement_names[0]}): a LoRA slot holds only A and B ([[lossy]] drops "
            "them)"
        )
    kinds = {"dora": [], "lora_bias": [], "embedding": []}
    for path, spec in adapter.specs.items():
        if spec.kind == "embedding":
            kinds["embedding"].append(path)
        if spec.dora:
            kinds["dora"].append(path)
        if spec.lora_bias:
            kinds["lora_bias"].append(path)
    if kinds["dora"]:
        ctx.lossy(f"DoRA magnitudes on {len(kinds['dora'])} layer(s) (e.g. {kinds['dora'][0]}): "
                  "a slot adds x·A·B only ([[lossy]] drops the magnitudes: outputs change)")
    if kinds["lora_bias"]:
        ctx.lossy(f"lora_bias on {len(kinds['lora_bias'])} layer(s) (e.g. "
                  f"{kinds['lora_bias'][0]}): slots have no bias input ([[lossy]] drops it)")
    if kinds["embedding"]:
        ctx.lossy(f"embedding LoRA on {', '.join(kinds['embedding'])}: slots are for linear "
                  "layers ([[lossy]] drops these layers)")
    ctx.check_lossy(where, "an ONNX Runtime adapter")
    out: dict[str, np.ndarray] = {}
    total = len(adapter.specs)
    for done, (path, layer) in enumerate(adapter.layers(), 1):
        if layer.kind != "linear":
            continue
        dtype = np.dtype(_DTYPES[str(wanted)]) if wanted else _native(layer.B.dtype)
        b = layer.B
        if b.dtype != dtype and b.dtype not in (np.float32, np.float64):
            b = b.astype(np.float32)  # bf16/f16 → scale in float32, as below
        b = scaled(b, adapter.scale(path))
        full = b
        if layer.out_rows is not None:
            full = np.zeros((layer.out_features, layer.rank), dtype=b.dtype)
            full[layer.rows()] = b
        out[path + SLOT_A] = np.ascontiguousarray(layer.A.T.astype(dtype, copy=False))
        out[path + SLOT_B] = np.ascontiguousarray(full.T.astype(dtype, copy=False))
        ctx.tick(done, total)
    if any(adapter.tensors.dtype(name) == "BF16" for name in adapter.tensors) and not wanted:
        ctx.note("bfloat16 tensors written as float32 (pass dtype to match the graph's slots)")
    if any(s.out_rows is not None for s in adapter.specs.values()):
        ctx.note("out_rows layers written with zero B rows for the rows they do not adapt")
    if any(adapter.scale(p) != 1.0 for p in adapter.specs):
        ctx.note("scales folded into lora_B (reading back gives alpha = rank, scale 1)")
    return out


def _native(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.float32, np.float16, np.float64) else np.dtype(np.float32)


def write_onnx_adapter(adapter: Adapter, out: Path, ctx: Context) -> None:
    ort = _ort()
    arrays = adapter_arrays(adapter, ctx, out)
    if not arrays:
        raise LoraformatError(out, "nothing to write: no linear layers")
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(1)
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    with atomic_path(out) as tmp:  # export_adapter opens the path itself
        writer.export_adapter(str(tmp))
    ctx.report.layers = len(arrays) // 2


def read_parameters(path: Path) -> dict[str, np.ndarray]:
    """Every parameter of an ``.onnx_adapter`` as a numpy array (copied out of ORT's views)."""
    ort = _ort()
    try:
        reader = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ORT raises its own exception types for a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoraformatError(path, f"not an ONNX Runtime adapter ({first})") from None
    return {name: np.array(value.numpy()) for name, value in reader.get_parameters().items()}


def read_onnx_adapter(path: Path, ctx: Context) -> Adapter:
    params = read_parameters(path)
    layers: dict[str, LoraLayer] = {}
    for name in sorted(params):
        if not name.endswith(SLOT_A):
            if not name.endswith(SLOT_B):
                raise LoraformatError(path, f"parameter {name!r} is not '<layer>.lora_A/.lora_B'")
            continue
        layer = name[: -len(SLOT_A)]
        a_t, b_t = params[name], params.get(layer + SLOT_B)
        if b_t is None:
            raise LoraformatError(path, f"{name} has no {layer}{SLOT_B}")
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[1] != b_t.shape[0]:
            raise LoraformatError(
                path, f"{layer}: lora_A {list(a_t.shape)} and lora_B {list(b_t.shape)} are not "
                "[in, r] and [r, out]",
            )
        if ctx.base is not None:
            dense = ctx.base.layers.get(layer)
            shape = (a_t.shape[0], b_t.shape[1])
            if dense is None or (dense.in_features, dense.out_features) != shape:
                raise LoraformatError(
                    path, f"{layer}: the base has no {shape[0]}→{shape[1]} layer of that name"
                )
        rank = int(a_t.shape[1])
        if rank == 0:
            continue  # a zero-rank parameter is the slot's "no adapter" default
        layers[layer] = LoraLayer(
            A=np.ascontiguousarray(a_t.T), B=np.ascontiguousarray(b_t.T), alpha=float(rank),
            in_features=int(a_t.shape[0]), out_features=int(b_t.shape[1]),
        )
    if not layers:
        raise LoraformatError(path, "no LoRA parameters in this adapter")
    for name in params:
        if name.endswith(SLOT_B) and name[: -len(SLOT_B)] + SLOT_A not in params:
            raise LoraformatError(path, f"{name} has no matching {SLOT_A}")
    # parameters are named by layer path: only names one architecture owns tell it
    architecture = adapter_architecture(path, ctx, sorted(layers), "an .onnx_adapter")
    ctx.report.layers = len(layers)
    ctx.note("ONNX Runtime adapters fold the scale into B: read back with alpha = rank (scale 1)")
    return Adapter.from_layers(
        architecture, layers, scaling="alpha/r",
        fingerprint=ctx.base.checkpoint.fingerprint() if ctx.base is not None else None,
        provenance={"converted_from": "onnx_adapter"},
    )


def sniff(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix == SUFFIX:
        return True
    with open(path, "rb") as handle:  # flatbuffers file identifier of ORT's adapter format
        return handle.read(8)[4:8] == b"TORT"


class OnnxAdapterCodec:
    name = NAME
    description = "ONNX Runtime .onnx_adapter for a LoRA-slot graph (export --lora-slots)"
    writes_directory = False
    options = ("dtype",)

    def sniff(self, path: Path) -> bool:
        return sniff(path)

    def read(self, path: Path, ctx: Context) -> Adapter:
        return read_onnx_adapter(path, ctx)

    def write(self, adapter: Adapter, path: Path, ctx: Context) -> None:
        write_onnx_adapter(adapter, path, ctx)


CODEC = OnnxAdapterCodec()
