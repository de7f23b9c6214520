"""LoRA slots in an exported graph, shared by the traced export (:mod:`.onnx`, which wraps the
plugin's module in :func:`slotted_export_model`) and the emitted slot decoders (:mod:`.emitter`):
the slot inputs' names, their zero-rank defaults and the metadata a slot graph carries."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import architecture as arch
from ..errors import LoraformatError
from ..onnx_io import SLOT_A, SLOT_B

#: The rank used for the traced example slot tensors (0 and 1 would be specialised by torch.export).
EXAMPLE_RANK = 2
#: ONNX model metadata keys a slot graph carries (read back by loraformat.runtime.Session).
META_ARCHITECTURE = "loraformat.architecture"
META_FINGERPRINT = "loraformat.base_fingerprint"
META_SLOTS = "loraformat.lora_slots"


def slot_input_names(path: str) -> tuple[str, str]:
    """The graph input names of a layer's slot (equal to the ``.onnx_adapter`` parameter names)."""
    return path + SLOT_A, path + SLOT_B


def add_slots(model: Any, paths: Sequence[str], architecture: str, fingerprint: str) -> None:
    """Give every slot input of the onnx_ir ``model`` a same-named zero-rank initializer, and
    record the slots, the architecture and the base's fingerprint in its metadata (nothing
    without ``paths``).

    A is [in, 0], B is [0, out]. ONNX Runtime rejects a run that omits a graph input without a
    default, and rejects adapter parameters that are not graph inputs; a zero-rank default
    satisfies both and makes the adapter term an empty sum.
    """
    import onnx_ir as ir

    if not paths:
        return
    model.metadata_props.update({
        META_ARCHITECTURE: architecture,
        META_FINGERPRINT: fingerprint,
        META_SLOTS: json.dumps(list(paths)),
    })
    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    for path in paths:
        for name, zero_axis in zip(slot_input_names(path), (1, 0), strict=True):
            value = inputs.get(name)
            if value is None:
                raise LoraformatError(None, f"the exported graph has no input {name}")
            dims = list(value.shape)
            fixed = dims[1 - zero_axis]
            if len(dims) != 2 or not isinstance(fixed, int):
                raise LoraformatError(None, f"graph input {name} has no static feature size")
            shape = [0, 0]
            shape[1 - zero_axis] = fixed
            if name in graph.initializers:
                continue
            value.const_value = ir.tensor(np.zeros(shape, value.dtype.numpy()), name=name)
            graph.register_initializer(value)


def slot_keywords(index: int) -> tuple[str, str]:
    """forward()'s keywords for slot ``index`` (graph names have dots, keywords cannot)."""
    return f"lora_{index}_A", f"lora_{index}_B"


def slotted_module(module: Any, paths: Sequence[str], keywords: Sequence[str]) -> Any:
    """A shallow copy of ``module`` whose forward also takes each slot's A and B.

    ``forward(<keywords>, lora_0_A, lora_0_B, lora_1_A, ...)``: the ``keywords`` (the module's own
    example-input names) go on to the module's ``forward``; slot ``i``'s tensors are set on the
    Dense at ``paths[i]`` for the duration of the call. The copy is of a subclass of the
    module's own class, so its state-dict keys — and hence the exported initializer names — stay
    exactly the checkpoint names (a wrapper module would prefix them). The signature is spelled
    out, one parameter per graph input, because the exporter maps dynamic axes by signature.
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
    own = list(keywords)
    slot_names = [name for i in range(len(paths)) for name in slot_keywords(i)]
    clash = set(own) & set(slot_names)
    if clash:
        raise LoraformatError(None, f"the export module already takes {sorted(clash)[0]}")

    def run(self: Any, values: dict[str, Any]) -> Any:
        for i, dense in enumerate(denses):
            key_a, key_b = slot_keywords(i)
            dense.lora_A, dense.lora_B = values[key_a], values[key_b]
        try:
            return cls.forward(self, **{k: values[k] for k in own})
        finally:
            for dense in denses:
                dense.lora_A = dense.lora_B = None

    every = [*own, *slot_names]
    if not all(name.isidentifier() for name in every):
        raise LoraformatError(None, f"export module input names are not identifiers: {own}")
    source = (
        f"def forward(self, {', '.join(every)}):\n"
        f"    return _run(self, {{{', '.join(f'{n!r}: {n}' for n in every)}}})\n"
    )
    scope: dict[str, Any] = {"_run": run}
    exec(source, scope)  # a fixed template over identifier names checked above
    slotted_cls = type(f"Slotted{cls.__name__}", (cls,), {"forward": scope["forward"]})
    slotted = copy.copy(module)
    slotted.__class__ = slotted_cls
    return slotted


def slotted_export_model(
    plain: arch.ExportModel,
    paths: Sequence[str],
    layers: Mapping[str, arch.DenseLayer],
    dtype: str = "float32",
) -> arch.ExportModel:
    """The plugin's :class:`ExportModel` with a slot on each of ``paths``: the slotted module,
    example A/B tensors of rank :data:`EXAMPLE_RANK`, graph inputs ``P.lora_A``/``P.lora_B`` and
    a dynamic ``rank_<i>`` axis per slot (shared by its A and B)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    keywords = list(plain.example_inputs)
    examples = dict(plain.example_inputs)
    names = list(plain.input_names)
    axes = {k: dict(v) for k, v in plain.dynamic_axes.items()}
    for i, path in enumerate(paths):
        layer = layers[path]
        key_a, key_b = slot_keywords(i)
        name_a, name_b = slot_input_names(path)
        examples[key_a] = torch.zeros(layer.in_features, EXAMPLE_RANK, dtype=torch_dtype)
        examples[key_b] = torch.zeros(EXAMPLE_RANK, layer.out_features, dtype=torch_dtype)
        names += [name_a, name_b]
        axes[name_a] = {1: f"rank_{i}"}
        axes[name_b] = {0: f"rank_{i}"}
    module = slotted_module(plain.module, paths, keywords)
    return arch.ExportModel(module, examples, names, list(plain.output_names), axes)


__all__ = [
    "EXAMPLE_RANK",
    "META_ARCHITECTURE",
    "META_FINGERPRINT",
    "META_SLOTS",
    "SLOT_A",
    "SLOT_B",
    "add_slots",
    "slot_input_names",
    "slot_keywords",
    "slotted_export_model",
    "slotted_module",
]
