"""Hot-swappable export: the base graph with a LoRA *slot* on each targeted dense layer.

For every targeted layer ``P`` (by default every linear layer the plugin lists) the graph takes two
extra inputs, ``P.lora_A`` [in, r] and ``P.lora_B`` [r, out], and computes
``y = base(x) + (x·A)·B`` — ONNX Runtime's multi-LoRA convention (A and B transposed against PEFT,
the scaling folded into B). Each slot has its own dynamic rank axis ``rank_<i>``. Each slot input
also gets a same-named zero-rank default initializer (A [in, 0], B [0, out]): with no adapter
active the extra product is an empty sum, the graph computes the plain base, and ONNX Runtime
accepts the run without those inputs. An adapter (``.onnx_adapter``, or a loraformat adapter
through :class:`loraformat.runtime.Session`) supplies the inputs per call.

Weights keep their checkpoint names as initializer names, as the merged export's do.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import architecture as arch
from ..atomic import TMP_MARKER, atomic_file, check_output
from ..base import BaseModel, open_base
from ..errors import LoraformatError

SLOT_A, SLOT_B = ".lora_A", ".lora_B"
#: The rank used for the traced example slot tensors (0 and 1 would be specialised by torch.export).
EXAMPLE_RANK = 2
DEFAULT_OPSET = 18
DTYPES = ("float32", "float16")
#: ONNX model metadata keys this export writes (read back by loraformat.runtime.Session).
META_ARCHITECTURE = "loraformat.architecture"
META_FINGERPRINT = "loraformat.base_fingerprint"
META_SLOTS = "loraformat.lora_slots"
PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class SlotExport:
    """What :func:`export_with_slots` wrote."""

    path: Path
    architecture: str
    slots: list[str]  # layer paths, in graph-input order
    input_names: list[str]  # the model's own inputs (slot inputs not included)
    output_names: list[str]
    opset: int
    external_data: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.path),
            "architecture": self.architecture,
            "slots": self.slots,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "opset": self.opset,
            "external_data": str(self.external_data) if self.external_data else None,
        }


def slot_input_names(path: str) -> tuple[str, str]:
    """The graph input names of a layer's slot (equal to the ``.onnx_adapter`` parameter names)."""
    return path + SLOT_A, path + SLOT_B


def resolve_targets(base: BaseModel, targets: Sequence[str] | None) -> list[str]:
    """Layer paths to give slots, in checkpoint order.

    ``None`` → every linear layer the plugin lists. Otherwise each entry is a layer path
    (``transformer.h.0.attn.c_attn``) or a module-name suffix (``q_proj``, ``self_attn.q_proj``)
    that must match at least one linear layer.
    """
    layers = base.layers
    linear = [path for path, layer in layers.items() if layer.kind == "linear"]
    if targets is None:
        if not linear:
            raise LoraformatError(base.path, "the plugin lists no linear layers to give slots")
        return linear
    chosen: set[str] = set()
    for target in targets:
        if target in layers:
            if layers[target].kind != "linear":
                raise LoraformatError(
                    base.path,
                    f"{target} is an {layers[target].kind} layer; slots take linear layers",
                )
            chosen.add(target)
            continue
        found = [p for p in linear if p.endswith("." + target) or p == target]
        if not found:
            names = sorted({layers[p].module_name for p in linear})
            raise LoraformatError(
                base.path,
                f"target {target!r} matches no linear layer (module names: {', '.join(names)})",
            )
        chosen.update(found)
    return [p for p in linear if p in chosen]


def export_with_slots(
    base: str | os.PathLike[str] | BaseModel,
    output: str | os.PathLike[str],
    *,
    targets: Sequence[str] | None = None,
    dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SlotExport:
    """Export ``base`` (a checkpoint directory or an open :class:`BaseModel`) with LoRA slots.

    The graph's inputs are the plugin export module's inputs (dynamic axes as it declares them);
    for each slot ``P.lora_A``/``P.lora_B`` are further inputs with defaults (see the module
    docstring). Writes ``output`` atomically; refuses to replace it unless ``overwrite``.
    """
    out = check_output(output, overwrite)
    if dtype not in DTYPES:
        raise LoraformatError(out, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    owned = not isinstance(base, BaseModel)
    model = open_base(base) if owned else base
    try:
        paths = resolve_targets(model, targets)
        steps = 4
        if progress:
            progress(0, steps)
        proto, export_model = _export(model, paths, dtype)
        if progress:
            progress(2, steps)
        add_slot_defaults(proto, paths)
        _set_metadata(
            proto,
            {
                META_ARCHITECTURE: model.architecture,
                META_FINGERPRINT: model.checkpoint.fingerprint(),
                META_SLOTS: json.dumps(paths),
            },
        )
        if progress:
            progress(3, steps)
        external = save_model(proto, out)
        if progress:
            progress(steps, steps)
        return SlotExport(
            out,
            model.architecture,
            paths,
            list(export_model.input_names),
            list(export_model.output_names),
            opset,
            external,
        )
    finally:
        if owned:
            model.close()


# -- the pieces -----------------------------------------------------------------------------------


def checkpoint_tensors(base: BaseModel, dtype: str = "float32") -> dict[str, Any]:
    """Every checkpoint tensor as a torch tensor of ``dtype`` (floating tensors only are cast)."""
    import torch

    target = getattr(torch, dtype)
    tensors = {}
    for name, array in base.checkpoint.items():
        tensor = torch.from_numpy(np.array(array))  # a copy: the map is read-only
        tensors[name] = tensor.to(target) if tensor.is_floating_point() else tensor
    return tensors


def slotted_module(module: Any, paths: Sequence[str], keywords: Sequence[str]) -> Any:
    """A shallow copy of ``module`` whose ``forward(*inputs, A0, B0, A1, B1, ...)`` fills slots.

    The leading positional arguments are passed on to the module's own ``forward`` as the
    ``keywords`` (its example-input names, in order).

    The copy is of a subclass of the module's own class, so its state-dict keys — and hence the
    exported initializer names — stay exactly the checkpoint names (a wrapper module would prefix
    them). Each targeted submodule must be a :class:`loraformat.architecture.modules.Dense`.
    """
    from ..architecture.modules import Dense

    denses = []
    for path in paths:
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            sub = None
        if not isinstance(sub, Dense):
            raise LoraformatError(
                None,
                f"the export module has no Dense layer at {path} "
                f"(found {type(sub).__name__ if sub is not None else 'nothing'})",
            )
        denses.append(sub)
    cls = type(module)
    names = list(keywords)

    def forward(self: Any, *args: Any) -> Any:
        inputs = dict(zip(names, args[: len(names)], strict=True))
        slots = args[len(names) :]
        for i, dense in enumerate(denses):
            dense.lora_A, dense.lora_B = slots[2 * i], slots[2 * i + 1]
        try:
            return cls.forward(self, **inputs)
        finally:
            for dense in denses:
                dense.lora_A = dense.lora_B = None

    slotted_cls = type(f"Slotted{cls.__name__}", (cls,), {"forward": forward})
    slotted = copy.copy(module)
    slotted.__class__ = slotted_cls
    return slotted


def _export(base: BaseModel, paths: Sequence[str], dtype: str) -> tuple[Any, arch.ExportModel]:
    import torch
    from torch.export import Dim

    tensors = checkpoint_tensors(base, dtype)
    options = arch.ExportOptions(lora_slots=tuple(paths))
    export_model = arch.export_model(base.architecture, base.config, tensors, options)
    module = export_model.module.eval()
    input_names = list(export_model.input_names)
    # example_inputs' keys are forward()'s keywords, in input_names order (the graph names may
    # differ: ``past_key_values.0.key`` is passed as ``past_key_values_0_key``).
    keywords = list(export_model.example_inputs)
    slotted = slotted_module(module, paths, keywords)

    torch_dtype = getattr(torch, dtype)
    args: list[Any] = [export_model.example_inputs[key] for key in keywords]
    dims: dict[str, Any] = {}
    shapes: list[Any] = []
    for name in input_names:
        axes = export_model.dynamic_axes.get(name, {})
        shapes.append(
            {axis: dims.setdefault(label, Dim(label)) for axis, label in axes.items()} or None
        )
    slot_names: list[str] = []
    layers = base.layers
    for i, path in enumerate(paths):
        layer = layers[path]
        rank = Dim(f"rank_{i}", min=0)
        args.append(torch.zeros(layer.in_features, EXAMPLE_RANK, dtype=torch_dtype))
        args.append(torch.zeros(EXAMPLE_RANK, layer.out_features, dtype=torch_dtype))
        shapes += [{1: rank}, {0: rank}]
        slot_names += slot_input_names(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # A and B of one slot share their rank axis; torch says so once per slot.
            warnings.filterwarnings("ignore", message=r".*The axis name: rank_\d+ will not be used")
            program = torch.onnx.export(
                slotted,
                tuple(args),
                dynamo=True,
                dynamic_shapes={"args": tuple(shapes)},
                input_names=[*input_names, *slot_names],
                output_names=list(export_model.output_names),
                opset_version=DEFAULT_OPSET,
                optimize=False,  # keep every initializer under its state-dict (checkpoint) name
                verbose=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraformatError(base.path, f"torch.onnx.export failed: {first}") from exc
    return program.model_proto, export_model


def add_slot_defaults(proto: Any, paths: Sequence[str]) -> None:
    """Give every slot input a same-named zero-rank initializer (A [in, 0], B [0, out]).

    ONNX Runtime rejects a run that omits a graph input without a default, and rejects adapter
    parameters that are not graph inputs; a zero-rank default satisfies both and makes the
    adapter term vanish.
    """
    from onnx import helper, numpy_helper

    inputs = {value.name: value for value in proto.graph.input}
    have = {init.name for init in proto.graph.initializer}
    for path in paths:
        for name, zero_axis in zip(slot_input_names(path), (1, 0), strict=True):
            value = inputs.get(name)
            if value is None:
                raise LoraformatError(None, f"the exported graph has no input {name}")
            dims = value.type.tensor_type.shape.dim
            shape = [0 if axis == zero_axis else dims[axis].dim_value for axis in range(2)]
            if any(d < 0 for d in shape) or shape[1 - zero_axis] == 0:
                raise LoraformatError(None, f"graph input {name} has no static feature size")
            np_dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            if name not in have:
                proto.graph.initializer.append(
                    numpy_helper.from_array(np.zeros(shape, np_dtype), name)
                )


def _set_metadata(proto: Any, values: Mapping[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)


def save_model(proto: Any, out: Path) -> Path | None:
    """Write ``proto`` atomically; weights go to ``<out>.data`` when the graph exceeds 2 GB."""
    import onnx

    if proto.ByteSize() < PROTOBUF_LIMIT:
        with atomic_file(out) as handle:
            handle.write(proto.SerializeToString())
        return None
    data = out.with_name(out.name + ".data")
    # onnx writes external data beside the model: stage both in a private sibling folder, then
    # move the data first and the model last, so a reader that sees the model sees its data.
    staging = Path(tempfile.mkdtemp(prefix=TMP_MARKER, suffix="-" + out.name, dir=out.parent))
    try:
        onnx.save_model(
            proto,
            str(staging / out.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        os.replace(staging / data.name, data)
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data
