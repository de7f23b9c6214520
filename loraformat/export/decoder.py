"""Generation-ready export of a (merged) decoder: KV-cache inputs and outputs, optionally fused.

For a built-in decoder family (a plugin whose ``spec(checkpoint)`` describes its decoder) the
graph is written op by op from that description by :mod:`.emitter` — GroupQueryAttention,
packed projections, MatMulNBits; fused already, so ``optimize`` has nothing to do — with the
plugin's torch export module as the ``verify_output`` oracle. Otherwise it is the plugin's export
module built with ``ExportOptions(with_past=True)`` and traced by
:func:`loraformat.export.onnx.export_onnx` (same weights, names and external-data rules as a
plain export). Either way its interface is the one optimum and ONNX Runtime users know:

========================== ========================================== =========
name                       shape                                      dtype
========================== ========================================== =========
``input_ids``              [batch, sequence]                          int64
``attention_mask``         [batch, past_sequence + sequence]          int64
``position_ids``           [batch, sequence]                          int64
``past_key_values.N.key``  [batch, kv_heads, past_sequence, head_dim] float
``past_key_values.N.value`` same                                      float
``logits`` (output)        [batch, sequence, vocab]                   float
``present.N.key/value``    [batch, kv_heads, past_sequence+sequence,   float
                           head_dim]
========================== ========================================== =========

A layer whose description carries other state than keys and values (a linear attention's
convolution and recurrent states, ``DecoderSpec.layer_caches``) has ``past_key_values.N.<name>``
→ ``present.N.<name>`` of their fixed sizes instead; a layer that keeps none has neither.

One graph serves prefill (``past_sequence`` = 0) and one-token decode steps (``sequence`` = 1).
``optimize=True`` applies :func:`loraformat.export.optimize.optimize_graph` (ONNX Runtime
fusions); the fused graph keeps this interface. ``dtype="float16"`` with ``optimize`` exports in
fp32, fuses, then converts to fp16 for GPU providers (``logits`` stay fp32).

``verify_output`` checks the graph before it is put in place: a prefill (batch 2, 5 tokens, empty
past) and a decode step (1 token after those 5) in ONNX Runtime against the torch export module;
logits and presents must agree within 1e-4·max(1, max|ref|) (plain fp32), 1e-3·… (fused fp32;
fused kernels reorder sums), 2e-2·… (fp16 against the fp32 module). fp16 graphs are run where
ONNX Runtime has the kernels (CUDA; the CPU provider for most ops); where it cannot even load
them, the result says ``verify_provider = "not run (...)"`` and only the export itself vouches
for the graph.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..architecture import ExportModel, ExportOptions
from ..atomic import check_output
from ..base import BaseModel, open_base
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ..merge.plan import MergePlan
from ..onnx_io import initializer_bytes, save_model
from .onnx import (
    DEFAULT_OPSET,
    VERIFY_MIN_COSINE,
    VERIFY_REL_TOL,
    Comparison,
    ExportResult,
    cosine,
    export_onnx,
    inputs_in,
    open_plan,
    quant_options,
    torch_dtype_named,
)
from .quantize import QuantOptions
from .runner import open_runner, providers_for, runner_name
from .slot_inputs import add_slot_defaults
from .stream import STREAM_EXTERNAL_BYTES, build_weightless, placeholder_tensors, weights_on_demand

Progress = Callable[[int, int], None]


@dataclass
class DecoderExportResult:
    """What :func:`export_decoder` wrote and measured."""

    export: ExportResult
    optimized: bool = False
    fusions: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    max_abs_diff: float | None = None
    tolerance: float | None = None
    verify_provider: str | None = None
    cosine: float | None = None  # verify: logits' cosine similarity to torch's
    min_cosine: float | None = None  # verify of int4/int8: the floor it had to reach
    #: how the graph was made: "emitted" from the decoder description, or "traced (<why>)"
    graph: str = ""

    @property
    def path(self) -> Path:
        return self.export.path

    def __getattr__(self, name: str) -> Any:
        # The plain export's fields (opset, dtype, initializers, external_data, ...), so callers
        # that report an ExportResult can report this too.
        if name == "export":
            raise AttributeError(name)
        return getattr(self.export, name)

    def to_json(self) -> dict[str, Any]:
        e = self.export
        return {
            "output": str(e.path),
            "external_data": str(e.external_data) if e.external_data else None,
            "opset": e.opset,
            "dtype": e.dtype,
            "nodes": self.nodes,
            "inputs": e.input_names,
            "outputs": e.output_names,
            "tensors_changed": e.tensors_changed,
            "optimized": self.optimized,
            "fusions": self.fusions,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "verify_provider": self.verify_provider,
            "cosine": self.cosine,
            "quantized_layers": e.quantized_layers,
            "graph": self.graph,
        }


# -- verification -------------------------------------------------------------------------------


def decoder_check_inputs(
    exported: ExportModel, vocab: int, batch: int = 2, prompt: int = 5, seed: int = 0
) -> list[dict[str, Any]]:
    """Keyword inputs for a prefill (``prompt`` tokens, empty past) and a decode step (1 token
    after them, past taken from the module's own prefill presents)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    names = dict(zip(exported.example_inputs, exported.input_names, strict=True))
    past_args = [k for k in exported.example_inputs if k.startswith("past_key_values_")]
    prefill: dict[str, Any] = {
        "input_ids": torch.randint(0, vocab, (batch, prompt), generator=g),
        "attention_mask": torch.ones(batch, prompt, dtype=torch.int64),
        "position_ids": torch.arange(prompt).expand(batch, prompt).contiguous(),
    }
    for k in past_args:
        # Each cache tensor empty: batch rows, a growing axis of length 0, a state's own sizes.
        example, axes = exported.example_inputs[k], exported.dynamic_axes.get(names[k], {})
        sizes = {"batch": batch, "past_sequence": 0}
        shape = [sizes.get(axes.get(a, ""), n) for a, n in enumerate(example.shape)]
        prefill[k] = torch.zeros(shape, dtype=example.dtype)
    with torch.no_grad():
        out = exported.module(**prefill)
    decode: dict[str, Any] = {
        "input_ids": torch.randint(0, vocab, (batch, 1), generator=g),
        "attention_mask": torch.ones(batch, prompt + 1, dtype=torch.int64),
        "position_ids": torch.full((batch, 1), prompt, dtype=torch.int64),
    }
    for k, present in zip(past_args, out[1:], strict=True):
        decode[k] = present.detach().clone()
    return [prefill, decode]


def verify_decoder(
    onnx_path: str | os.PathLike[str],
    exported: ExportModel,
    checks: Sequence[Mapping[str, Any]],
    providers: Sequence[str] | None = None,
) -> Comparison:
    """Run the graph in ONNX Runtime and ``exported.module`` in torch on each of ``checks``
    (keyword inputs; fed to the graph under ``exported.input_names``, in order).

    Returns the max abs difference over all outputs, the largest |reference| value, the provider
    and the cosine similarity of the logits (all checks together).
    """
    import torch

    session = open_runner(onnx_path, providers)
    graph_name = dict(zip(exported.example_inputs, exported.input_names, strict=True))
    diff, scale = 0.0, 0.0
    got_logits, ref_logits = [], []
    outputs = [session.run({graph_name[k]: v for k, v in inputs.items()}) for inputs in checks]
    provider = session.provider
    del session  # its copy of the weights goes before the torch reference runs
    for inputs, got in zip(checks, outputs, strict=True):
        with torch.no_grad():
            ref = exported.module(**dict(inputs))
        for i, (r, o) in enumerate(zip(ref, got, strict=True)):
            r32 = r.detach().to(torch.float32).numpy()
            o32 = np.asarray(o, dtype=np.float32)
            if r32.shape != o32.shape:
                raise LoraformatError(
                    onnx_path, f"verify: ONNX Runtime output has shape {list(o32.shape)}, torch "
                    f"{list(r32.shape)}",
                )
            if i == 0:
                got_logits.append(o32.ravel())
                ref_logits.append(r32.ravel())
            if r32.size:
                diff = max(diff, float(np.max(np.abs(r32 - o32))))
                scale = max(scale, float(np.max(np.abs(r32))))
    cos = cosine(np.concatenate(got_logits), np.concatenate(ref_logits))
    return Comparison(diff, scale, provider, cos)


# -- the entry point ----------------------------------------------------------------------------


def export_decoder(
    base: str | os.PathLike[str] | BaseModel,
    out: str | os.PathLike[str],
    *,
    adapters: Sequence[str | os.PathLike[str] | Adapter] = (),
    weights: Sequence[float] | None = None,
    dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    optimize: bool = False,
    verify_output: bool = False,
    external_data: bool | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    quant: QuantOptions | None = None,
    emit: bool = True,
    slots: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> DecoderExportResult:
    """Export the decoder ``base`` (with ``adapters`` merged, weighted) with a KV cache to ``out``.

    See the module docstring for the graph's interface. Nothing is written when the export,
    the optimization or ``verify_output`` fails. Merge refusals are
    :func:`~loraformat.merge.plan.plan_merge`'s; an architecture whose plugin has no KV-cache
    export is refused by the plugin.

    Where the architecture describes its decoder (``spec(checkpoint)``, every built-in decoder
    family) and :mod:`.emitter` can write that description, the graph is emitted op by op,
    already fused (GroupQueryAttention, packed projections, SkipSimplifiedLayerNormalization),
    and ``optimize`` has nothing left to do; otherwise it is traced from the plugin's export
    module. ``result.graph`` says which, and why not emitted. ``emit=False`` forces the trace.

    ``slots`` (layer paths; emitted graphs only, :func:`~.slots.export_with_slots` traces the
    rest) gives those layers LoRA slots with zero-rank defaults, ``metadata`` goes into the
    model's metadata; ``verify_output`` then checks the graph with no adapter active.
    """
    from .optimize import optimize_graph

    quant = quant_options(dtype, quant)
    target = check_output(out, overwrite)
    if optimize and dtype == "bfloat16":  # its fusions and converter know fp32 and fp16 only
        raise LoraformatError(target, "--optimize exports float32, float16 or int4/int8, "
                              "not bfloat16")
    if target.suffix != ".onnx":
        raise LoraformatError(target, "an ONNX export's output must end in .onnx")
    captured: dict[str, Any] = {}

    def build(model: BaseModel, tensors: Mapping[str, Any], options: ExportOptions) -> ExportModel:
        exported = model.arch.export_model(model.info, tensors, options)
        if not any(n.startswith("past_key_values.") for n in exported.input_names):
            raise LoraformatError(
                None, f"the {model.architecture} plugin's export module has no KV-cache inputs "
                "(is it a decoder?)",
            )
        captured.update(
            architecture=model.architecture, config=dict(model.config), keep=set(tensors),
            vocab=int(tensors_vocab(exported, model.config)),
        )
        return exported

    float16 = dtype == "float16"
    result = DecoderExportResult(export=None)  # type: ignore[arg-type]

    def rewrite(graph: Any) -> Any:
        if not optimize:
            return graph
        graph, report = optimize_graph(
            graph, captured["architecture"], captured["config"], captured["keep"],
            float16=float16,
        )
        result.optimized, result.fusions = True, report.fusions
        return graph

    def check(path: Path, exported: ExportModel) -> None:
        checks = decoder_check_inputs(exported, captured["vocab"])
        try:
            c = verify_decoder(path, exported, checks, providers_for(dtype))
        except LoraformatError:
            raise
        except Exception as exc:  # ORT's own exception types
            reason = str(exc).strip().splitlines()[0][:200]
            if float16:  # CPU builds may lack fp16 kernels for some fused ops: graph only
                result.verify_provider = f"not run (fp16 on this ONNX Runtime: {reason})"
                return
            raise LoraformatError(
                target, f"verify failed: ONNX Runtime cannot run the graph: {reason}"
            ) from exc
        diff, provider = c.max_abs_diff, c.provider
        result.max_abs_diff, result.verify_provider, result.cosine = diff, provider, c.cosine
        if quant is not None:
            floor = VERIFY_MIN_COSINE[quant.bits]
            result.min_cosine = floor
            if not c.cosine >= floor:
                raise LoraformatError(
                    target, f"verify failed: int{quant.bits} logits in ONNX Runtime ({provider}) "
                    f"have cosine {c.cosine:.4f} to fp32 torch (needs {floor}) on a prefill and "
                    "a decode step; nothing was written",
                )
            return
        # two passes (prefill, decode) through the cache: twice a plain export's half-precision
        # tolerance; fusions reorder fp32 arithmetic
        rel = 2 * VERIFY_REL_TOL[dtype] if dtype != "float32" else (1e-3 if optimize else 1e-4)
        tol = rel * max(1.0, c.scale)
        result.tolerance = tol
        if not diff <= tol:
            raise LoraformatError(
                target, f"verify failed: {runner_name(provider)} differs from torch by "
                f"{diff:.3g} (tolerance {tol:.3g}) on a prefill and a decode step; "
                "nothing was written",
            )

    with contextlib.ExitStack() as stack:
        model = base if isinstance(base, BaseModel) else stack.enter_context(open_base(base))
        spec, why = emittable(model, dtype, quant, opset) if emit else (None, "asked to trace")
        if spec is not None:
            plan = open_plan(stack, model, adapters, weights=weights, force=force,
                             allow_nonfinite=allow_nonfinite)

            def verify_emitted(path: Path, exported: ExportModel) -> None:
                captured.update(vocab=int(tensors_vocab(exported, model.config)))
                check(path, exported)

            result.export = export_emitted(
                model, spec, target, plan, dtype=dtype, quant=quant, opset=opset,
                external_data=external_data, progress=progress,
                verifier=verify_emitted if verify_output else None, slots=slots,
                metadata=metadata,
            )
            result.nodes, result.graph = result.export.nodes, "emitted"
            return result
        result.graph = f"traced ({why})"
        if slots or metadata:
            raise LoraformatError(target, f"a slot decoder is emitted only, not traced: {why}")
        # fp16 with fusions: export in fp32, fuse, then convert (ONNX Runtime's converter keeps
        # the ops without fp16 kernels in fp32). The base stays open until the export is done.
        export_dtype = "float32" if optimize and float16 else dtype
        plain = export_onnx(
            model, target, adapters=adapters, weights=weights, dtype=export_dtype, quant=quant,
            opset=opset, options=ExportOptions(with_past=True), verify_output=False,
            external_data=external_data, force=force, allow_nonfinite=allow_nonfinite,
            overwrite=overwrite, progress=progress, build=build, rewrite=rewrite,
            verifier=check if verify_output else None,
        )
    plain.dtype = dtype
    result.export, result.nodes = plain, plain.nodes
    return result


def emittable(
    model: BaseModel, dtype: str, quant: QuantOptions | None, opset: int
) -> tuple[Any, str]:
    """(the decoder description to emit, "") or (None, why the graph is traced instead)."""
    from ..architecture.decoder import DecoderFamily, language_model
    from .emitter import unsupported

    arch = getattr(model.arch, "impl", model.arch)
    describe = getattr(arch, "spec", None)
    if describe is None:
        return None, f"the {model.architecture} plugin does not describe its decoder"
    if isinstance(arch, DecoderFamily) and type(arch).blocks is not DecoderFamily.blocks:
        # The emitter writes the default blocks; a family's own pieces exist only as torch.
        return None, f"the {model.architecture} plugin builds the decoder from its own blocks"
    try:
        # a multimodal checkpoint's decoder is described by its language model's config
        spec = describe(language_model(model.info))
    except NotImplementedError:
        return None, f"the {model.architecture} plugin does not describe its decoder"
    why = unsupported(spec, model.config)
    if why is None and dtype == "bfloat16":
        why = "bfloat16 (no CPU kernels to verify GroupQueryAttention with)"
    if why is None and quant is not None and quant.embeddings:
        why = "quantized embeddings"
    if why is None and opset < 13:
        why = f"opset {opset}"
    return (spec, "") if why is None else (None, why)


def export_emitted(
    model: BaseModel,
    spec: Any,
    target: Path,
    plan: MergePlan | None,
    *,
    dtype: str,
    quant: QuantOptions | None,
    opset: int,
    external_data: bool | None,
    progress: Progress | None,
    verifier: Callable[[Path, ExportModel], None] | None,
    slots: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> ExportResult:
    """Write the decoder ``spec`` describes (:mod:`.emitter`) to ``target``, weights streamed
    through ``plan``. ``verifier(temporary path, oracle)`` gets the plugin's torch export module
    (built without weights; each weight read as an op uses it) before the output is put in
    place."""
    from .emitter import EmitOptions, emit_decoder, max_positions

    options = EmitOptions("float32" if quant is not None else dtype, quant,
                          max_positions(model.config), opset)

    graph = emit_decoder(spec, model.checkpoint, plan, options, progress, slots)
    add_slot_defaults(graph, slots)
    graph.metadata_props.update(metadata or {})
    if external_data is None:
        external_data = initializer_bytes(graph) > STREAM_EXTERNAL_BYTES
    result = ExportResult(
        path=target, external_data=None, opset=opset, dtype=dtype, nodes=len(list(graph.graph)),
        initializers=len(graph.graph.initializers), tensors_changed=len(plan.ops) if plan else 0,
        input_names=[v.name for v in graph.graph.inputs if v.name not in graph.graph.initializers],
        output_names=[v.name for v in graph.graph.outputs],
        quantized_layers=sum(n.op_type == "MatMulNBits" for n in graph.graph),
        traced="emitted from the decoder description",
    )

    def check(path: Path) -> None:
        assert verifier is not None
        torch_dtype = torch_dtype_named("float32" if quant is not None else dtype)
        tensors = placeholder_tensors(model.checkpoint, torch_dtype)
        exported = inputs_in(build_weightless(
            lambda: model.arch.export_model(model.info, tensors, ExportOptions(with_past=True)),
            tensors,
        ), torch_dtype)
        import onnxruntime

        # ORT warns once per slot that an initializer is also a graph input: by design (slots)
        onnxruntime.set_default_logger_severity(3)
        try:
            with weights_on_demand(exported.module, model.checkpoint, plan, torch_dtype):
                verifier(path, exported)
        finally:
            onnxruntime.set_default_logger_severity(2)  # ORT's default

    result.external_data = save_model(graph, target, external_data,
                                      check if verifier is not None else None)
    return result


def tensors_vocab(exported: ExportModel, config: Mapping[str, Any]) -> int:
    """The vocabulary size for random token ids: the config's, else the logits' width."""
    vocab = config.get("vocab_size")
    if vocab:
        return int(vocab)
    import torch

    with torch.no_grad():
        out = exported.module(**exported.example_inputs)
    return int(out[0].shape[-1])


__all__ = ["DecoderExportResult", "decoder_check_inputs", "export_decoder", "verify_decoder"]
