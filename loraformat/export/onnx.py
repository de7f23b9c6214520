"""ONNX export of a base model, plain or with adapters merged into its weights.

The plugin builds an export-ready torch module; ``torch.onnx.export`` (the dynamo exporter) turns
it into a graph. The export is *streamed* (:mod:`.stream`): the module is built and traced without
weights, and each weight is written from the checkpoint through the merge plan, one tensor at a
time, in the output dtype — or, for ``int4``/``int8``, quantized to MatMulNBits as it is written
(:mod:`.quantize`). Two properties are kept on purpose:

* **Initializer names are the checkpoint's tensor names, in the checkpoint's layout.** The
  exporter's default optimizer constant-folds ``Transpose(W)`` of every nn.Linear weight into a new
  initializer ``val_N`` (recording the old name only in ``folded_from`` metadata) and merges
  identical initializers (a random model's LayerNorm ones). So the graph is exported unoptimized,
  and the same onnxscript optimizer is then run with the checkpoint tensors hidden from it (turned
  into graph inputs for the duration): shapes, constants and rewrites are optimized, the weights
  are neither folded nor deduplicated. ONNX Runtime folds the remaining ``Transpose(W)`` once, at
  session creation, so inference pays nothing for it. Surgery and other tools find every layer by
  name.
* **No added latency.** A merged export is the base's export with different initializer values:
  same nodes, same inputs and outputs (tests compare the two graphs node by node).

Weights go to external data (``<name>.data`` next to the model) above 64 MiB (a protobuf is
serialized whole in memory, and is capped at 2 GB); see :func:`loraformat.onnx_io.save_model` for
how a replaced model's data is handled atomically.
The default opset is :data:`DEFAULT_OPSET`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..architecture import CheckpointInfo, ExportModel, ExportOptions
from ..atomic import check_output
from ..base import BaseModel, open_base
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ..merge.checkpoint import merged_in, plan_for_base
from ..merge.plan import MERGED_KEY, MergePlan, open_adapters
from ..onnx_io import EXTERNAL_DATA_THRESHOLD, initializer_bytes, save_model, weights_as_inputs
from ..quant.survival import SurvivalReport
from .graph_cache import cached_trace, code_digest
from .prewrite import finish, parameter_dtypes, staged_weights
from .quantize import QuantOptions, merge_survival, quantize_dense_layers, quantize_embeddings
from .repeat import cut_to_depth, repeated_graph
from .runner import open_runner, ort_providers, providers_for, runner_name
from .slot_inputs import add_slots, slotted_export_model
from .stream import (
    STREAM_EXTERNAL_BYTES,
    attach_weights,
    build_weightless,
    placeholder_tensors,
    weights_on_demand,
)

#: Opset used unless ``--opset`` says otherwise (ONNX Runtime ≥ 1.14 runs it; LayerNormalization
#: is a single op from 17 on).
DEFAULT_OPSET = 18
DTYPES = ("float32", "float16", "bfloat16", "int4", "int8")
#: Quantized export dtypes and their bit widths (dense layers as MatMulNBits, the rest fp32).
QUANT_DTYPES = {"int4": 4, "int8": 8}
#: ``--verify`` of a quantized export refuses outputs whose cosine similarity to the fp32 torch
#: module is below this: it catches a broken graph, it is not a quality claim (the figure itself
#: is reported; a tiny random model with a large random DoRA adapter measures 0.97 in int4).
VERIFY_MIN_COSINE = {4: 0.9, 8: 0.99}

#: ``--verify`` of a float export: the largest abs difference to torch allowed, relative to
#: max(1, max|reference|). bf16 keeps 8 significant bits (fp16 11): its rounding step is 8× fp16's.
VERIFY_REL_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 8e-2}

Progress = Callable[[int, int], None]


@dataclass
class ExportResult:
    """What an export wrote, and what ``verify`` measured."""

    path: Path
    external_data: Path | None
    opset: int
    dtype: str
    nodes: int
    initializers: int
    tensors_changed: int = 0
    max_abs_diff: float | None = None
    verify_provider: str | None = None
    tolerance: float | None = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    quantized_layers: int = 0
    traced: str = ""  # how the graph was traced (all layers, or a few repeated)
    prewritten: bool = False  # the weights were written by a second process while tracing
    cosine: float | None = None  # verify: outputs' cosine similarity to torch's
    min_cosine: float | None = None  # verify of int4/int8: the floor it had to reach
    survival: SurvivalReport | None = None  # int4/int8: how much of the merged adapters kept
    #: stored tensors the export left out, by group (:attr:`~loraformat.base.BaseModel.left_out`)
    left_out: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.path),
            "external_data": str(self.external_data) if self.external_data else None,
            "opset": self.opset,
            "dtype": self.dtype,
            "nodes": self.nodes,
            "initializers": self.initializers,
            "tensors_changed": self.tensors_changed,
            "max_abs_diff": self.max_abs_diff,
            "verify_provider": self.verify_provider,
            "tolerance": self.tolerance,
            "quantized_layers": self.quantized_layers,
            "traced": self.traced,
            "prewritten": self.prewritten,
            "cosine": self.cosine,
            "left_out": self.left_out,
        } | ({"survival": self.survival.to_json()} if self.survival is not None else {})


# -- tensors ------------------------------------------------------------------------------------


def torch_dtype_named(name: str) -> Any:
    import torch

    floats = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in floats:
        raise LoraformatError(None, f"--dtype must be one of {', '.join(floats)}, got {name!r}")
    return floats[name]


def _to_torch(array: np.ndarray, dtype: Any) -> Any:
    """A torch tensor owning a copy of ``array``; floating tensors cast to ``dtype``."""
    import torch

    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        array = np.asarray(array).astype(np.float32)  # bf16/f16/f64 → f32 first (numpy knows all)
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    return torch.from_numpy(np.array(array, copy=True))


def merged_tensors(
    base: BaseModel,
    plan: MergePlan | None,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every checkpoint tensor as a torch tensor, with ``plan`` applied (fp32 accumulation, in the
    base dtype, then cast to ``dtype``) — so the export sees exactly the weights the merged
    checkpoint would hold."""
    torch_dtype = torch_dtype_named(dtype)
    ckpt = base.checkpoint
    ops = plan.ops if plan is not None else {}
    tensors: dict[str, Any] = {}
    total, done = len(ops), 0
    for name in ckpt.names():
        value = ckpt.numpy(name)
        op = ops.get(name)
        if op is not None:
            value = op.apply(value)
            done += 1
            if progress is not None:
                progress(done, total)
        tensors[name] = _to_torch(value, torch_dtype)
    return tensors


# -- graph --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress to stdout and logs warnings for optional packages."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def optimize_keeping_weights(model: Any, keep: set[str]) -> None:
    """Run onnxscript's optimizer on an onnx_ir model without touching the initializers in
    ``keep``: they become graph inputs while it runs (not constants, so never folded,
    transposed, renamed or deduplicated) and initializers again afterwards."""
    import onnxscript.optimizer

    with weights_as_inputs(model, keep):
        onnxscript.optimizer.optimize(model)


def export_graph(
    exported: ExportModel,
    keep: set[str],
    opset: int = DEFAULT_OPSET,
) -> Any:
    """The onnx_ir model of ``exported``'s module, optimized but with ``keep``'s names intact."""
    import torch

    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            exported.module,
            (),
            kwargs=dict(exported.example_inputs),
            input_names=list(exported.input_names),
            output_names=list(exported.output_names),
            dynamic_axes={k: dict(v) for k, v in exported.dynamic_axes.items()},
            opset_version=opset,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
        model = program.model
        optimize_keeping_weights(model, keep)
    return model


def inputs_in(exported: ExportModel, torch_dtype: Any) -> ExportModel:
    """``exported`` with its floating example inputs in ``torch_dtype``."""
    exported.example_inputs = {
        k: (v.to(torch_dtype) if getattr(v, "is_floating_point", lambda: False)() else v)
        for k, v in exported.example_inputs.items()
    }
    return exported


def build_graph(
    model: BaseModel,
    exported: ExportModel,
    tensors: Mapping[str, Any],
    options: ExportOptions,
    torch_dtype: Any,
    opset: int = DEFAULT_OPSET,
    repeat: bool = True,
    make: Callable[[CheckpointInfo, Mapping[str, Any], ExportOptions], ExportModel] | None = None,
) -> tuple[Any, str]:
    """The optimized graph of ``exported`` (the full, weightless export module) and a line
    saying how it was made: a few layers traced and repeated (:mod:`.repeat`) where the
    architecture says how its layers repeat and ``repeat`` is on, else every layer traced; the
    trace itself comes from the graph cache (:mod:`.graph_cache`) when it holds it.

    ``make(info, tensors, options)`` builds an export module like ``exported`` for a cut
    checkpoint (default: the plugin's ``export_model``; the LoRA-slot export wraps it)."""
    make = make or model.arch.export_model
    code = code_digest(getattr(model.arch, "impl", model.arch))
    hits: list[bool] = []

    def trace(
        module: ExportModel, keep: set[str], config: Mapping[str, Any],
        annotate: Callable[[Any], None] | None = None,
    ) -> Any:
        identity = {"architecture": model.arch.id, "code": code, "config": dict(config),
                    "options": repr(options)}

        def produce() -> Any:
            graph = export_graph(module, keep, opset)
            if annotate is not None:  # what the trace showed, kept with it in the cache
                annotate(graph)
            return graph

        graph, hit = cached_trace(module, keep, opset, identity, produce)
        hits.append(hit)
        return graph

    def said(how: str) -> str:
        return how + ("; the trace from the graph cache" if any(hits) else "")

    layer_repeat = model.arch.layer_repeat(model.info) if repeat else None
    how = "every layer traced"
    if layer_repeat is not None and len(layer_repeat.kinds) > 1:
        shapes = dict(model.info.shapes)
        built: list[dict[str, Any]] = []  # the config the cut module was built from

        def build_at(depth: int, path: str) -> ExportModel:
            cut = {n: tensors[n] for n in cut_to_depth(list(tensors), path, depth)}
            config = dict(model.info.config)
            built.append(config)
            if layer_repeat.depth_key is not None:
                # A dotted key reaches into a nested config (a multimodal text_config).
                *outer, key = layer_repeat.depth_key.split(".")
                holder = config
                for part in outer:
                    holder[part] = holder = dict(holder[part])
                holder[key] = depth
            info = dataclasses.replace(
                model.info, config=config, shapes={n: shapes[n] for n in cut if n in shapes}
            )
            slots = tuple(cut_to_depth(list(options.lora_slots), path, depth))
            cut_options = dataclasses.replace(options, lora_slots=slots)
            small = build_weightless(lambda: make(info, cut, cut_options), cut)
            return inputs_in(small, torch_dtype)

        graph, how = repeated_graph(
            exported, layer_repeat, shapes, build_at,
            lambda small, keep, annotate: trace(small, keep, built[-1], annotate),
        )
        if graph is not None:
            return graph, said(how)
    return trace(exported, set(tensors), model.info.config), said(how)


# -- verification -------------------------------------------------------------------------------


def random_inputs(
    exported: ExportModel, config: Mapping[str, Any], seed: int = 0
) -> dict[str, Any]:
    """Random inputs shaped like the examples, with batch 3 and sequence 5 where those axes are
    dynamic and nothing else depends on them (so the check also exercises the dynamic axes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    resize = not any(
        name not in ("batch", "sequence")
        for axes in exported.dynamic_axes.values()
        for name in axes.values()
    )
    sizes = {"batch": 3, "sequence": 5}
    vocab = int(config.get("vocab_size") or 0)
    inputs = {}
    for name, example in exported.example_inputs.items():
        shape = list(example.shape)
        if resize:
            for axis, axis_name in exported.dynamic_axes.get(name, {}).items():
                shape[axis] = sizes.get(axis_name, shape[axis])
        if example.dtype.is_floating_point:
            inputs[name] = torch.randn(shape, generator=g).to(example.dtype)
        elif name == "input_ids" or name.endswith("input_ids"):
            high = vocab or int(example.max()) + 1
            inputs[name] = torch.randint(0, max(high, 1), shape, generator=g, dtype=example.dtype)
        elif "mask" in name:
            inputs[name] = torch.ones(shape, dtype=example.dtype)
        elif shape == list(example.shape):
            inputs[name] = example.clone()
        else:
            inputs[name] = torch.zeros(shape, dtype=example.dtype)
    return inputs


@dataclass(frozen=True)
class Comparison:
    """ONNX Runtime against torch on the same inputs."""

    max_abs_diff: float  # over all outputs
    scale: float  # largest |reference| value
    provider: str
    cosine: float  # of the first output (the logits), flattened


def verify(
    onnx_path: str | os.PathLike[str],
    exported: ExportModel,
    inputs: Mapping[str, Any],
    providers: Sequence[str] | None = None,
) -> tuple[float, float, str]:
    """Run ``onnx_path`` in ONNX Runtime and ``exported.module`` in torch on ``inputs``.

    Returns (max abs difference over all outputs, largest |reference| value, provider used).
    """
    c = compare(onnx_path, exported, inputs, providers)
    return c.max_abs_diff, c.scale, c.provider


def compare(
    onnx_path: str | os.PathLike[str],
    exported: ExportModel,
    inputs: Mapping[str, Any],
    providers: Sequence[str] | None = None,
) -> Comparison:
    """:func:`verify`'s run, with the first output's cosine similarity too. ``providers`` may
    name :data:`~.runner.REFERENCE_EVALUATOR` instead (:mod:`.runner`)."""
    import torch

    session = open_runner(onnx_path, providers)
    # ``inputs`` are keyed by keyword; a graph name may differ (past_key_values.0.key ↔ _0_).
    graph_name = dict(zip(exported.example_inputs, exported.input_names, strict=False))
    feed = {graph_name.get(k, k): v for k, v in inputs.items()}
    got = session.run(feed)
    provider = session.provider
    del session  # its copy of the weights goes before the torch reference runs
    with torch.no_grad():
        ref = exported.module(**dict(inputs))
    if isinstance(ref, torch.Tensor):
        ref = [ref]
    elif isinstance(ref, Mapping):
        ref = list(ref.values())
    ref = [r for r in _flatten(ref)]
    diff, scale, cos = 0.0, 0.0, None
    for r, o in zip(ref, got, strict=False):
        r32 = r.detach().to(torch.float32).numpy()
        o32 = np.asarray(o, dtype=np.float32)
        if r32.shape != o32.shape:
            raise LoraformatError(
                onnx_path, f"verify: ONNX Runtime output has shape {list(o32.shape)}, torch "
                f"{list(r32.shape)}",
            )
        diff = max(diff, float(np.max(np.abs(r32 - o32))) if r32.size else 0.0)
        scale = max(scale, float(np.max(np.abs(r32))) if r32.size else 0.0)
        cos = cosine(o32, r32) if cos is None else cos
    return Comparison(diff, scale, provider, 1.0 if cos is None else cos)


def _flatten(items: Any) -> list[Any]:
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


# -- the entry point ----------------------------------------------------------------------------


def open_plan(
    stack: contextlib.ExitStack,
    base: BaseModel,
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    *,
    weights: Sequence[float] | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> MergePlan | None:
    """The merge plan of ``adapters`` (opened on ``stack``) on ``base``; None without adapters."""
    if not adapters:
        return None
    opened = open_adapters(stack, adapters)
    return plan_for_base(
        base, opened, weights=weights, force=force, allow_nonfinite=allow_nonfinite
    )


def quant_options(dtype: str, quant: QuantOptions | None) -> QuantOptions | None:
    """The quantization an export ``dtype`` asks for: int4/int8 → MatMulNBits, floats → none."""
    if dtype in QUANT_DTYPES:
        bits = QUANT_DTYPES[dtype]
        if quant is None:
            return QuantOptions(bits=bits)
        return dataclasses.replace(quant, bits=bits)
    if quant is not None:
        raise LoraformatError(None, f"quantization options apply to --dtype int4/int8, not {dtype}")
    return None


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two arrays, flattened (1.0 for two zero arrays)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / denom) if denom else float(np.array_equal(x, y))


def export_onnx(
    base: str | os.PathLike[str] | BaseModel,
    out: str | os.PathLike[str],
    *,
    adapters: Sequence[str | os.PathLike[str] | Adapter] = (),
    weights: Sequence[float] | None = None,
    plan: MergePlan | None = None,
    dtype: str = "float32",
    quant: QuantOptions | None = None,
    opset: int = DEFAULT_OPSET,
    options: ExportOptions | None = None,
    verify_output: bool = False,
    external_data: bool | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    build: Callable[[CheckpointInfo, Mapping[str, Any], ExportOptions], ExportModel] | None = None,
    rewrite: Callable[[Any], Any] | None = None,
    verifier: Callable[[Path, ExportModel], None] | None = None,
    repeat_layers: bool = True,
    prewrite: bool | None = None,
) -> ExportResult:
    """Export ``base`` (with ``adapters`` merged, weighted) to the ONNX file ``out``, streamed.

    The graph is traced from a weightless module and every weight is written straight from the
    checkpoint through the merge plan, one tensor at a time (:mod:`.stream`); ``plan`` may be
    given instead of ``adapters`` by callers that computed it. ``dtype`` is float32, float16, or
    int4/int8: dense layers as MatMulNBits (``quant`` says how; :mod:`.quantize`), the rest fp32.

    ``options`` are passed to the plugin (KV cache, LoRA slots); ``options.lora_slots`` gives
    those layers LoRA slots (:mod:`.slot_inputs`: the plugin's module wrapped, the slot inputs'
    zero-rank defaults, the slot metadata; ``verify_output`` runs the graph with no adapter).
    ``build(info, tensors, options)`` replaces the plugin's ``export_model`` (for the whole model
    and for the cut ones a repeated trace builds); ``rewrite(graph)`` returns the onnx_ir
    graph to write instead (a pass such as fusion, run after quantization, weights still lazy);
    ``verifier(temporary path, export model)`` replaces the default check below; while it runs,
    the module's weights are read from the checkpoint as its ops use them
    (:func:`~.stream.weights_on_demand`). ``verify_output`` runs ONNX Runtime on
    random inputs (batch 3, sequence 5) against the torch module (fp32 weights for int4/int8)
    before the output is put in place, and refuses it (nothing written) when the max abs
    difference exceeds 1e-4·max(1, max|ref|) (fp32) or 1e-2·max(1, max|ref|) (fp16), or, for
    int4/int8, when the logits' cosine similarity is below :data:`VERIFY_MIN_COSINE`; the
    figures are in the result. Weights go to an external data file above
    :data:`~.stream.STREAM_EXTERNAL_BYTES` unless ``external_data`` says otherwise. Merge
    refusals are :func:`~loraformat.merge.plan.plan_merge`'s. Where the architecture says how
    its layers repeat, a few are traced and the rest repeated (:mod:`.repeat`; the same graph);
    ``repeat_layers=False`` traces every layer (``result.traced`` says which was done). The
    weights are written by a second process while the graph is traced (:mod:`.prewrite`) when
    they go to an external data file and come to
    :data:`~.prewrite.PREWRITE_MIN_BYTES` (``prewrite`` True/False forces it; same output).
    """
    target = check_output(out, overwrite)
    if target.suffix != ".onnx":
        raise LoraformatError(target, "an ONNX export's output must end in .onnx")
    if dtype not in DTYPES:
        raise LoraformatError(target, f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    quant = quant_options(dtype, quant)
    float_dtype = "float32" if quant is not None else dtype
    options = options or ExportOptions()
    with contextlib.ExitStack() as stack:
        model = base if isinstance(base, BaseModel) else stack.enter_context(open_base(base))
        if plan is None:
            plan = open_plan(
                stack, model, adapters, weights=weights, force=force,
                allow_nonfinite=allow_nonfinite,
            )
        # the weight writer starts first: its imports overlap torch's and the module's build
        staging, writer = stack.enter_context(staged_weights(
            target, model.checkpoint, False if external_data is False else prewrite
        ))
        torch_dtype = torch_dtype_named(float_dtype)
        tensors = placeholder_tensors(model.checkpoint, torch_dtype)
        make = build or model.arch.export_model

        def slotted(info: CheckpointInfo, cut: Mapping[str, Any],
                    cut_options: ExportOptions) -> ExportModel:
            # the slot step, on the whole module and on the cut ones a repeated trace builds
            # (their example inputs are cast to the export dtype by build_graph)
            return slotted_export_model(make(info, cut, cut_options), cut_options.lora_slots,
                                        model.layers, float_dtype)

        exported = inputs_in(build_weightless(
            lambda: make(model.info, tensors, options), tensors
        ), torch_dtype)
        if writer is not None and not writer.submit(
            model.checkpoint, plan, parameter_dtypes(exported.module, model.checkpoint),
            model.layers, quant,
        ):
            writer = None
        slots = options.lora_slots
        graph, traced = build_graph(
            model, slotted_export_model(exported, slots, model.layers, float_dtype)
            if slots else exported, tensors, options, torch_dtype, opset,
            repeat=repeat_layers, make=slotted if slots else make,
        )
        add_slots(graph, slots, model.architecture, model.checkpoint.fingerprint())
        attach_weights(graph, model.checkpoint, plan, progress)
        quantized = quantize_dense_layers(graph, model.layers, quant) if quant else []
        if quant is not None and quant.embeddings:
            quantized += quantize_embeddings(graph, model.layers, quant)
        if rewrite is not None:
            graph = rewrite(graph)
        record = plan.merged if plan is not None else merged_in(model.checkpoint)
        if record:  # the adapters in these weights, so a second merge of one is refused
            graph.metadata_props[MERGED_KEY] = json.dumps(record)
        if external_data is None:
            external_data = initializer_bytes(graph) > STREAM_EXTERNAL_BYTES
        prewritten = finish(writer, graph, external_data, progress)
        result = ExportResult(
            path=target,
            external_data=None,
            opset=opset,
            dtype=dtype,
            nodes=len(list(graph.graph)),
            initializers=len(graph.graph.initializers),
            tensors_changed=len(plan.ops) if plan else 0,
            input_names=list(exported.input_names),
            output_names=list(exported.output_names),
            quantized_layers=len(quantized),
            traced=traced,
            prewritten=prewritten,
            survival=merge_survival(model.checkpoint, plan, model.layers, quantized, quant,
                                    np.dtype(float_dtype)) if quant is not None else None,
            left_out=model.left_out,
        )

        def check(path: Path) -> None:
            # The torch reference reads each weight from the checkpoint when an op uses it, so
            # the model is never in memory twice (once here, once in ONNX Runtime).
            with weights_on_demand(exported.module, model.checkpoint, plan, torch_dtype):
                if verifier is not None:
                    verifier(path, exported)
                    return
                inputs = random_inputs(exported, model.config)
                c = compare(path, exported, inputs, providers_for(dtype))
            diff, scale, provider, cos = c.max_abs_diff, c.scale, c.provider, c.cosine
            result.max_abs_diff, result.verify_provider, result.cosine = diff, provider, cos
            if quant is not None:
                floor = VERIFY_MIN_COSINE[quant.bits]
                result.min_cosine = floor
                if not cos >= floor:
                    raise LoraformatError(
                        target, f"verify failed: int{quant.bits} outputs in ONNX Runtime "
                        f"({provider}) have cosine {cos:.4f} to fp32 torch (needs {floor}); "
                        f"max abs diff {diff:.3g}; nothing was written",
                    )
                return
            tol = VERIFY_REL_TOL[dtype] * max(1.0, scale)
            result.tolerance = tol
            if not diff <= tol:
                raise LoraformatError(
                    target, f"verify failed: {runner_name(provider)} differs from torch by "
                    f"{diff:.3g} (tolerance {tol:.3g}); nothing was written",
                )

        result.external_data = save_model(
            graph, target, external_data, check if verify_output or verifier else None,
            staging=staging, prepared=prewritten,
        )
        return result


__all__ = [
    "DEFAULT_OPSET",
    "DTYPES",
    "EXTERNAL_DATA_THRESHOLD",
    "QUANT_DTYPES",
    "VERIFY_MIN_COSINE",
    "VERIFY_REL_TOL",
    "Comparison",
    "ExportResult",
    "build_graph",
    "compare",
    "cosine",
    "export_graph",
    "export_onnx",
    "merged_tensors",
    "open_plan",
    "optimize_keeping_weights",
    "ort_providers",
    "quant_options",
    "save_model",
    "verify",
]
