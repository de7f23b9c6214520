"""Hot-swappable export: the base graph with a LoRA *slot* on each targeted dense layer.

For every targeted layer ``P`` (by default every linear layer the plugin lists) the graph takes two
extra inputs, ``P.lora_A`` [in, r] and ``P.lora_B`` [r, out], and computes
``y = base(x) + (x·A)·B`` — ONNX Runtime's multi-LoRA convention (A and B transposed against PEFT,
the scaling folded into B). Each slot has its own dynamic rank axis ``rank_<i>``. Each slot input
also gets a same-named zero-rank default initializer (A [in, 0], B [0, out]): with no adapter
active the extra product is an empty sum, the graph computes the plain base, and ONNX Runtime
accepts the run without those inputs. An adapter (``.onnx_adapter``, or a loraformat adapter
through :class:`loraformat.runtime.Session`) supplies the inputs per call.

The graph is made by the same pipeline as the plain/merged export (:mod:`loraformat.export.onnx`:
the exporter, then onnxscript's optimizer with the weights hidden from it), so initializer names
are the checkpoint's tensor names and the slot graph differs from the merged graph only by the
slot inputs and their MatMul/Add nodes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import architecture as arch
from ..atomic import check_output
from ..base import BaseModel, open_base
from ..errors import LoraformatError
from ..onnx_io import initializer_bytes, save_model
from .onnx import (
    DEFAULT_OPSET,
    QUANT_DTYPES,
    VERIFY_MIN_COSINE,
    build_graph,
    compare,
    quant_options,
    random_inputs,
)
from .prewrite import finish, parameter_dtypes, staged_weights
from .quantize import QuantOptions, quantize_dense_layers, quantize_embeddings
from .slot_inputs import SLOT_A, SLOT_B, add_slot_defaults, slot_input_names
from .stream import (
    STREAM_EXTERNAL_BYTES,
    attach_weights,
    build_weightless,
    placeholder_tensors,
    weights_on_demand,
)

DTYPES = ("float32", "float16", *QUANT_DTYPES)

#: The rank used for the traced example slot tensors (0 and 1 would be specialised by torch.export).
EXAMPLE_RANK = 2
#: ONNX model metadata keys this export writes (read back by loraformat.runtime.Session).
META_ARCHITECTURE = "loraformat.architecture"
META_FINGERPRINT = "loraformat.base_fingerprint"
META_SLOTS = "loraformat.lora_slots"


@dataclass(frozen=True)
class SlotExport:
    """What :func:`export_with_slots` wrote."""

    path: Path
    architecture: str
    slots: list[str]  # layer paths, in graph-input order
    input_names: list[str]  # the model's own inputs (slot inputs not included)
    output_names: list[str]
    opset: int
    dtype: str
    external_data: Path | None = None
    max_abs_diff: float | None = None  # with verify: slot graph (no adapter) vs the torch base
    tolerance: float | None = None
    traced: str = ""  # how the graph was traced (all layers, or a few repeated)
    cosine: float | None = None  # verify of int4/int8: the logits' cosine to fp32 torch
    prewritten: bool = False  # the weights were written by a second process while tracing

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.path),
            "architecture": self.architecture,
            "slots": self.slots,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "opset": self.opset,
            "dtype": self.dtype,
            "external_data": str(self.external_data) if self.external_data else None,
            "max_abs_diff": self.max_abs_diff,
            "traced": self.traced,
            "prewritten": self.prewritten,
            "cosine": self.cosine,
        }


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
    with_past: bool = False,
    verify_output: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    repeat_layers: bool = True,
    quant: QuantOptions | None = None,
    prewrite: bool | None = None,
) -> SlotExport:
    """Export ``base`` (a checkpoint directory or an open :class:`BaseModel`) with LoRA slots.

    The graph's inputs are the plugin export module's inputs (dynamic axes as it declares them);
    for each slot ``P.lora_A``/``P.lora_B`` are further inputs with defaults (see the module
    docstring). ``with_past`` asks the plugin for its KV-cache inputs/outputs too (decoders), so
    generation can switch adapters per request. ``verify_output`` runs ONNX Runtime (no adapter
    active) against the plugin's torch module on random inputs before the file is put in place,
    and refuses a difference over
    1e-4·max(1, max|ref|) (fp32) or 2e-2·max(1, max|ref|) (fp16). Writes ``output`` atomically;
    refuses to replace it unless ``overwrite``. The graph is traced as a plain export's is (a few
    layers repeated where the plugin allows — ``repeat_layers=False`` traces all — and the graph
    cache); the weights are written while it is traced as :func:`~.onnx.export_onnx` writes them
    (``prewrite``).

    ``dtype`` ``int4``/``int8`` (``quant`` says how) writes the base's dense layers as
    MatMulNBits, as a plain quantized export does, while the slots stay float32: adapters are
    switched on a quantized base (``verify`` then needs the logits' cosine to the fp32 torch base
    to reach :data:`~.onnx.VERIFY_MIN_COSINE`).
    """
    out = check_output(output, overwrite)
    if out.suffix != ".onnx":
        raise LoraformatError(out, "an ONNX export's output must end in .onnx")
    if dtype not in DTYPES:
        raise LoraformatError(out, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    quant = quant_options(dtype, quant)
    float_dtype = "float32" if quant is not None else dtype
    owned = not isinstance(base, BaseModel)
    model = open_base(base) if owned else base
    stack = contextlib.ExitStack()  # the output's staging directory and weight writer
    try:
        paths = resolve_targets(model, targets)
        if with_past:
            emitted = _emitted_slots(model, out, paths, dtype, quant, opset, verify_output,
                                     overwrite, progress)
            if emitted is not None:
                return emitted
        steps = 3
        if progress:
            progress(0, steps)
        staging, writer = stack.enter_context(staged_weights(out, model.checkpoint, prewrite))
        import torch

        torch_dtype = getattr(torch, float_dtype)
        tensors = placeholder_tensors(model.checkpoint, torch_dtype)
        options = arch.ExportOptions(with_past=with_past, lora_slots=tuple(paths))
        plain = build_weightless(
            lambda: model.arch.export_model(model.info, tensors, options), tensors
        )
        plain.example_inputs = {k: _cast(v, float_dtype) for k, v in plain.example_inputs.items()}

        def slotted(info: arch.CheckpointInfo, cut: Mapping[str, Any],
                    cut_options: arch.ExportOptions) -> arch.ExportModel:
            # the same wrapping for the few layers a repeated trace builds (build_graph casts
            # the example inputs to the export dtype afterwards)
            small = model.arch.export_model(info, cut, cut_options)
            return slotted_export_model(small, cut_options.lora_slots, model.layers, float_dtype)

        if writer is not None and not writer.submit(
            model.checkpoint, None, parameter_dtypes(plain.module, model.checkpoint),
            model.layers, quant,
        ):
            writer = None
        graph, traced = build_graph(
            model, slotted_export_model(plain, paths, model.layers, float_dtype), tensors, options,
            torch_dtype, opset, repeat=repeat_layers, make=slotted,
        )
        if progress:
            progress(1, steps)
        add_slot_defaults(graph, paths)
        attach_weights(graph, model.checkpoint, None)
        if quant is not None:
            quantize_dense_layers(graph, model.layers, quant)
            if quant.embeddings:
                quantize_embeddings(graph, model.layers, quant)
        graph.metadata_props.update(
            {
                META_ARCHITECTURE: model.architecture,
                META_FINGERPRINT: model.checkpoint.fingerprint(),
                META_SLOTS: json.dumps(paths),
            }
        )
        measured: dict[str, float] = {}

        def check(path: Path) -> None:
            import onnxruntime

            inputs = random_inputs(plain, model.config)
            # ORT warns once per slot that an initializer is also a graph input — by design here.
            onnxruntime.set_default_logger_severity(3)
            try:
                with weights_on_demand(plain.module, model.checkpoint, None, torch_dtype):
                    c = compare(path, plain, inputs, providers=["CPUExecutionProvider"])
            finally:
                onnxruntime.set_default_logger_severity(2)  # ORT's default
            diff, scale, provider = c.max_abs_diff, c.scale, c.provider
            if quant is not None:
                floor = VERIFY_MIN_COSINE[quant.bits]
                measured.update(diff=diff, cosine=c.cosine)
                if not c.cosine >= floor:
                    raise LoraformatError(
                        out, f"verify failed: {dtype} outputs in ONNX Runtime ({provider}, no "
                        f"adapter) have cosine {c.cosine:.4f} to fp32 torch (needs {floor}); "
                        "nothing was written",
                    )
                return
            tol = (1e-4 if dtype == "float32" else 2e-2) * max(1.0, scale)
            measured.update(diff=diff, tol=tol)
            if not diff <= tol:
                raise LoraformatError(
                    out,
                    f"verify failed: ONNX Runtime ({provider}, no adapter) differs from torch by "
                    f"{diff:.3g} (tolerance {tol:.3g}); nothing was written",
                )

        external = initializer_bytes(graph) > STREAM_EXTERNAL_BYTES
        prewritten = finish(writer, graph, external)
        data = save_model(graph, out, external, check=check if verify_output else None,
                          staging=staging, prepared=prewritten)
        if progress:
            progress(steps, steps)
        return SlotExport(
            out,
            model.architecture,
            paths,
            list(plain.input_names),
            list(plain.output_names),
            opset,
            dtype,
            data,
            measured.get("diff"),
            measured.get("tol"),
            traced,
            measured.get("cosine"),
            prewritten,
        )
    finally:
        stack.close()
        if owned:
            model.close()


def _emitted_slots(
    model: BaseModel, out: Path, paths: Sequence[str], dtype: str, quant: QuantOptions | None,
    opset: int, verify_output: bool, overwrite: bool,
    progress: Callable[[int, int], None] | None,
) -> SlotExport | None:
    """A KV-cache slot decoder written by :func:`~.decoder.export_decoder`'s emitter (packed
    projections, GroupQueryAttention; slot terms on each layer's part of a packed output), or
    None where the decoder cannot be emitted (then it is traced below)."""
    from .decoder import emittable, export_decoder

    if emittable(model, dtype, quant, opset)[0] is None:
        return None
    metadata = {
        META_ARCHITECTURE: model.architecture,
        META_FINGERPRINT: model.checkpoint.fingerprint(),
        META_SLOTS: json.dumps(list(paths)),
    }
    result = export_decoder(
        model, out, dtype=dtype, quant=quant, opset=opset, verify_output=verify_output,
        overwrite=overwrite, progress=progress, slots=paths, metadata=metadata,
    )
    e = result.export
    names = [n for n in e.input_names if not n.endswith((SLOT_A, SLOT_B))]
    return SlotExport(
        out, model.architecture, list(paths), names, list(e.output_names), opset, dtype,
        e.external_data, result.max_abs_diff, result.tolerance, "emitted from the decoder "
        "description", result.cosine,
    )


def _cast(value: Any, dtype: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(getattr(torch, dtype))
    return value


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


