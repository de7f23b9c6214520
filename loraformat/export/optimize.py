"""ONNX Runtime graph optimizations for an exported decoder (or any exported transformer).

Two fusion passes run in order, both producing ``com.microsoft`` contrib ops that ONNX Runtime's
CPU and CUDA providers implement:

1. **onnxscript's ORT fusions** (``onnxscript.rewriter.ort_fusions``), written for graphs from the
   dynamo exporter: ``SkipLayerNormalization`` (residual Add + LayerNorm), ``FastGelu`` (tanh
   GELU), ``SimplifiedLayerNormalization``/``SkipSimplifiedLayerNormalization`` (RMSNorm),
   ``RotaryEmbedding``, ``FusedMatMul`` (a MatMul with a transposed operand), and the attention
   fusions (SDPA → ``MultiHeadAttention``/``GroupQueryAttention``) where the graph's attention
   matches their pattern.
2. **ONNX Runtime's transformer optimizer** (``onnxruntime.transformers.optimizer.optimize_model``,
   ``opt_level=0`` so the result stays portable across providers) with the architecture's
   ``model_type`` and the config's head count and hidden size, for whatever the first pass left.

While pass 1 runs, the checkpoint's tensors are hidden from it as graph inputs (as in
:func:`loraformat.export.onnx.optimize_keeping_weights`), so weights keep their checkpoint names
and layouts and are never constant-folded, renamed or deduplicated.

``float16=True`` then converts the graph with ONNX Runtime's ``convert_float_to_float16``: weights,
activations and the KV cache in fp16, ``logits`` kept fp32 (``keep_io_types``), ops without fp16
kernels left in fp32. That is for GPU providers; on CPU only the graph is checked.

Which fusions fire on the built-in plugins' graphs is recorded in the result (``fusions``): see
:data:`EXPECTED_FUSIONS`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..architecture import get_architecture
from ..atomic import check_output
from ..errors import LoraformatError

#: Fused contrib ops counted in :attr:`OptimizeReport.fusions`.
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "RotaryEmbedding",
    "FusedMatMul",
)
#: What fires on the built-in decoders' with-past graphs (per model, L = layers), checked in tests.
EXPECTED_FUSIONS = {
    "gpt2": {"SkipLayerNormalization": "2L+1", "FastGelu": "L"},
    "llama": {
        "SkipSimplifiedLayerNormalization": "2L", "SimplifiedLayerNormalization": "1",
        "RotaryEmbedding": "2L",
    },
}


@dataclass
class OptimizeReport:
    """What the optimizer did: fused-op counts and node counts before and after."""

    architecture: str
    model_type: str
    nodes_before: int
    nodes_after: int
    fusions: dict[str, int] = field(default_factory=dict)
    onnxscript_fusions: dict[str, int] = field(default_factory=dict)
    float16: bool = False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The fusion passes log every pattern they try and print statistics."""
    loggers = [logging.getLogger(n) for n in ("onnxruntime", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def hidden_initializers(model: Any, keep: set[str]) -> Iterator[None]:
    """Turn the initializers named in ``keep`` into graph inputs while the block runs (so passes
    cannot fold, rename or deduplicate them), and back into initializers afterwards."""
    graph = model.graph
    hidden = []
    for name in list(graph.initializers):
        if name not in keep:
            continue
        value = graph.initializers.pop(name)
        tensor = value.const_value
        value.const_value = None
        graph.inputs.append(value)
        hidden.append((value, tensor))
    try:
        yield
    finally:
        for value, tensor in hidden:
            graph.inputs.remove(value)
            value.const_value = tensor
            graph.register_initializer(value)


def _large(value: Any) -> bool:
    """An initializer not held in memory (lazy or external), or over 1 MiB."""
    import onnx_ir as ir

    tensor = value.const_value
    if tensor is None:
        return False
    return isinstance(tensor, (ir.LazyTensor, ir.ExternalTensor)) or tensor.nbytes > 2**20


def hide_initializers(model: Any, names: set[str]) -> dict[str, Any]:
    """Turn the initializers in ``names`` into graph inputs; returns name → tensor for
    :func:`restore_initializers` (which may run on a copy of the graph, e.g. after a protobuf
    round trip)."""
    graph = model.graph
    hidden = {}
    for name in list(graph.initializers):
        if name not in names:
            continue
        value = graph.initializers.pop(name)
        hidden[name] = value.const_value
        value.const_value = None
        graph.inputs.append(value)
    return hidden


def restore_initializers(model: Any, hidden: dict[str, Any]) -> None:
    """Make the hidden graph inputs initializers again, each with its tensor — cast lazily to the
    input's dtype if a pass changed it (the fp16 conversion). Inputs a pass removed stay gone."""
    import onnx_ir as ir

    graph = model.graph
    for value in list(graph.inputs):
        tensor = hidden.get(value.name)
        if tensor is None:
            continue
        graph.inputs.remove(value)
        if value.dtype is not None and value.dtype != tensor.dtype:
            tensor = ir.LazyTensor(
                lambda t=tensor, dt=value.dtype: ir.Tensor(
                    np.asarray(t.numpy()).astype(dt.numpy()), name=t.name
                ),
                dtype=value.dtype, shape=tensor.shape, name=tensor.name,
            )
        value.const_value = tensor
        graph.register_initializer(value)


def count_ops(model: Any) -> dict[str, int]:
    """Op-type counts of an onnx_ir model or an ``onnx.ModelProto`` (top-level graph)."""
    nodes = model.graph.node if hasattr(model.graph, "node") else model.graph
    return dict(collections.Counter(n.op_type for n in nodes))


def _config_int(config: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        if config.get(key):
            return int(config[key])
    return 0


def optimize_graph(
    model: Any,
    architecture: str,
    config: Mapping[str, Any],
    keep: set[str] = frozenset(),  # type: ignore[assignment]
    float16: bool = False,
) -> tuple[Any, OptimizeReport]:
    """Fuse ``model`` (an onnx_ir model, changed in place and returned) for ONNX Runtime.

    ``keep`` names the initializers (the checkpoint's tensors) that must survive with their
    names and values. Returns (the optimized onnx_ir model, the report).
    """
    import onnx_ir as ir
    from onnxruntime.transformers.optimizer import optimize_model
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    before = len(list(model.graph))
    # The architecture says which of ONNX Runtime's optimizer passes apply (``ort_model_type``);
    # one that names none gets the generic encoder/decoder set ("bert").
    model_type = get_architecture(architecture).ort_model_type or "bert"
    # The weights stay hidden (graph inputs) through both passes and the fp16 conversion, so no
    # pass folds or renames them, and the protobuf ONNX Runtime's optimizer needs never holds
    # them: lazy (streamed) weights are still unread when the graph is written.
    hide = set(keep) | {name for name, v in model.graph.initializers.items() if _large(v)}
    with _quiet():
        hidden = hide_initializers(model, hide)
        model, counts = optimize_for_ort(model)
        proto = ir.to_proto(model)
        optimized = optimize_model(
            proto,
            model_type=model_type,
            num_heads=_config_int(config, "n_head", "num_attention_heads"),
            hidden_size=_config_int(config, "n_embd", "hidden_size"),
            opt_level=0,
        )
        if float16:
            # ONNX shape inference, not ORT's symbolic one: that writes temporaries into the cwd.
            optimized.convert_float_to_float16(
                use_symbolic_shape_infer=False, keep_io_types=["logits"]
            )
    proto = optimized.model
    ops = count_ops(proto)
    report = OptimizeReport(
        architecture=architecture,
        model_type=model_type,
        nodes_before=before,
        nodes_after=len(proto.graph.node),
        fusions={op: ops[op] for op in FUSED_OPS if ops.get(op)},
        onnxscript_fusions={k: v for k, v in counts.items() if v},
        float16=float16,
    )
    result = ir.from_proto(proto)
    restore_initializers(result, hidden)
    return result, report


def optimize_file(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    base: str | os.PathLike[str],
    *,
    float16: bool = False,
    external_data: bool | None = None,
    overwrite: bool = False,
) -> OptimizeReport:
    """Fuse the exported model ``src`` of the checkpoint ``base`` into ``out`` (atomically).

    ``base`` gives the architecture, the config (heads, hidden size) and the tensor names that
    keep their names. ``src`` is not modified.
    """
    import onnx_ir as ir

    from ..base import open_base
    from ..onnx_io import save_model

    target = check_output(out, overwrite)
    with open_base(base) as model:
        architecture, config = model.architecture, dict(model.config)
        keep = set(model.checkpoint.names())
    try:
        graph = ir.load(os.fspath(src))
    except Exception as exc:  # onnx/protobuf raise their own types for unreadable files
        raise LoraformatError(src, f"cannot read the ONNX model: {exc}") from exc
    graph, report = optimize_graph(graph, architecture, config, keep, float16=float16)
    save_model(graph, target, external_data)
    return report


__all__ = [
    "EXPECTED_FUSIONS",
    "FUSED_OPS",
    "OptimizeReport",
    "count_ops",
    "hidden_initializers",
    "hide_initializers",
    "optimize_file",
    "optimize_graph",
    "restore_initializers",
]
