"""Weight-only int4/int8 export: dense layers become ONNX Runtime ``MatMulNBits`` nodes.

Runs on an exported onnx_ir graph whose checkpoint weights are still lazy (see
:mod:`loraformat.export.stream`), so each weight is quantized only while it is written, one at a
time. For every linear :class:`~loraformat.architecture.DenseLayer` the plugin lists whose weight
feeds only matrix products — ``MatMul(x, Transpose(W))`` for an nn.Linear ([out, in]) or
``MatMul(x, W)`` for a Conv1D ([in, out]) — each such ``MatMul`` is replaced by
``MatMulNBits(x, W_Q4, W_scales[, W_zero_points])`` (``com.microsoft``; the names ONNX Runtime's
own ``MatMulNBitsQuantizer`` gives them), with ``K`` = in-features and ``N`` = out-features; a
bias stays the ``Add`` it was. The packing is :mod:`loraformat.quant.matmulnbits` (bit-exact with
ONNX Runtime's quantizer). Weights used any other way (an embedding table also used as a tied
LM head, say) stay in float. ``lm_head`` (a dense layer outside the blocks) is quantized only
when asked: it decides the logits directly.

Embedding tables (``--quantize-embeddings``, int4 only) become ``GatherBlockQuantized`` —
``UINT4``/``INT4`` data, block scales (and zero points) along the hidden dimension, as ONNX
Runtime's quantizer writes a ``Gather`` (:mod:`loraformat.quant.gather_block`, bit-exact with it).
A table also read as a tied LM head keeps its float copy for the head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..architecture import DenseLayer
from ..quant import gather_block, matmulnbits
from ..quant.survival import SurvivalReport, measure

MS_DOMAIN = "com.microsoft"
#: Dense layers outside the transformer blocks whose quantization is opt-in.
HEAD_LAYERS = ("lm_head",)


@dataclass(frozen=True)
class QuantOptions:
    """How dense layers are quantized (``--dtype int4/int8``, ``--block-size``, ...).

    ``accuracy_level`` is MatMulNBits' attribute: the compute type ONNX Runtime may use (1 fp32,
    2 fp16, 3 bf16, 4 int8 activations); 4 is what ONNX Runtime's model builder picks for CPU
    int4 and is what makes int4 decode fast there. ``None`` leaves it unset (fp32 compute).
    """

    bits: int = 4
    block_size: int = matmulnbits.DEFAULT_BLOCK_SIZE
    symmetric: bool = False
    accuracy_level: int | None = 4
    #: True/False: quantize ``lm_head`` or keep it float; None: the exporter's default — an
    #: emitted decoder (:mod:`.emitter`) quantizes it (its logits' cosine to fp32 equals ONNX
    #: Runtime's own quantizer's, and the head is the largest matrix read per decode step),
    #: a traced graph keeps it float.
    lm_head: bool | None = None
    embeddings: bool = False

    def __post_init__(self) -> None:
        matmulnbits.check_params(self.bits, self.block_size)
        if self.embeddings and self.bits != 4:
            raise ValueError("quantized embeddings are int4 only (GatherBlockQuantized)")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy level must be 0-4, got {self.accuracy_level}")


#: Rows of a weight copied per step of :func:`transposed`.
TRANSPOSE_ROWS = 128


def transposed(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``w.T`` as a C-contiguous array, copied in blocks of :data:`TRANSPOSE_ROWS` rows: each
    block's columns land in cache-sized runs (faster than ``np.ascontiguousarray(w.T)`` and
    torch's: README, "Why the design is as it is"). ``out`` [cols, rows] (a view, such as some
    columns of a larger array) receives it instead of a new array."""
    rows, cols = w.shape
    if out is None:
        out = np.empty((cols, rows), w.dtype)
    for i in range(0, rows, TRANSPOSE_ROWS):
        out[:, i:i + TRANSPOSE_ROWS] = w[i:i + TRANSPOSE_ROWS].T
    return out


def dense_parts(
    weight: np.ndarray, layout: str, options: QuantOptions, float_dtype: np.dtype
) -> dict[str, np.ndarray]:
    """The MatMulNBits initializers of one dense weight (``layout`` ``out_in`` for nn.Linear,
    ``in_out`` for Conv1D), by name suffix: ``_Q<bits>`` (packed), ``_scales`` (in
    ``float_dtype``) and, asymmetric, ``_zero_points``. The one computation both the lazy
    initializers here and the weight-writing process (:mod:`.prewrite`) run."""
    w = np.asarray(weight, dtype=np.float32)
    if layout != "in_out":
        w = transposed(w)  # the quantizer reads [K, N]
    q = matmulnbits.quantize(
        w, bits=options.bits, block_size=options.block_size, symmetric=options.symmetric,
        weight_is_transposed=True,
    )
    parts = {f"_Q{options.bits}": q.packed, "_scales": q.scales.astype(float_dtype)}
    if q.zero_points is not None:
        parts["_zero_points"] = q.zero_points
    return parts


def table_parts(
    table: np.ndarray, options: QuantOptions, float_dtype: np.dtype
) -> dict[str, np.ndarray]:
    """The GatherBlockQuantized initializers of one embedding table, by name suffix: ``_Q4``
    (``INT4``/``UINT4`` values), ``_scales`` (in ``float_dtype``), asymmetric ``_zero_points``
    (``UINT4``). Shared with :mod:`.prewrite` as :func:`dense_parts` is."""
    import ml_dtypes

    table = np.asarray(table)
    if table.dtype != np.float16:
        table = table.astype(np.float32)
    q = gather_block.quantize_table(table, options.block_size, options.symmetric)
    data_np = ml_dtypes.int4 if options.symmetric else ml_dtypes.uint4
    parts = {"_Q4": q.data.astype(data_np), "_scales": q.scales.astype(float_dtype)}
    if q.zero_points is not None:
        parts["_zero_points"] = q.zero_points.astype(ml_dtypes.uint4)
    return parts


def quantized_targets(
    layers: Mapping[str, DenseLayer], options: QuantOptions
) -> tuple[dict[str, DenseLayer], dict[str, DenseLayer]]:
    """(dense layers, embedding tables) the options ask to quantize, by layer path — before the
    graph says which of them it can take (a weight used any other way stays float)."""
    dense = {
        path: layer for path, layer in layers.items()
        if layer.kind == "linear" and (path not in HEAD_LAYERS or options.lm_head)
    }
    tables = {
        path: layer for path, layer in layers.items()
        if options.embeddings and layer.kind == "embedding"
    }
    return dense, tables


class _Shared:
    """One weight's quantized parts, computed when the first is written and dropped after the
    last, so the parts written one after another cost one quantization and no lasting memory."""

    def __init__(self, compute: Any, parts: int) -> None:
        self.compute, self.remaining = compute, parts
        self.result: dict[str, np.ndarray] | None = None

    def part(self, suffix: str) -> np.ndarray:
        if self.result is None:
            self.result = self.compute()
        value = self.result[suffix]
        self.remaining -= 1
        if self.remaining <= 0:
            self.result = None
        return value


def _matmuls(weight: Any, layout: str) -> tuple[list[Any], list[Any]] | None:
    """(MatMul nodes taking ``weight`` as B, Transpose nodes in between), or None if the weight
    has any other use."""
    matmuls, transposes = [], []
    for use in weight.uses():
        node = use.node
        if layout == "in_out":
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or use.idx != 1:
                return None
            matmuls.append(node)
            continue
        perm = node.attributes.get("perm")
        if node.op_type != "Transpose" or (perm is not None and list(perm.as_ints()) != [1, 0]):
            return None
        transposes.append(node)
        for inner in node.outputs[0].uses():
            if inner.node.op_type != "MatMul" or inner.idx != 1:
                return None
            matmuls.append(inner.node)
    return (matmuls, transposes) if matmuls else None


def _initializer(graph: Any, name: str, shape: tuple[int, ...], dtype: Any, func: Any) -> Any:
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
    value.const_value = ir.LazyTensor(func, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    graph.register_initializer(value)
    return value


def _lazy_parts(
    graph: Any,
    name: str,
    shapes: Mapping[str, tuple[tuple[int, ...], Any]],
    compute: Callable[[], dict[str, np.ndarray]],
) -> list[Any]:
    """One lazy initializer ``name + suffix`` per entry of ``shapes`` (suffix → (shape, onnx_ir
    dtype)), in its order: the parts ``compute()`` returns (:func:`dense_parts`,
    :func:`table_parts`), computed once for all of them (:class:`_Shared`)."""
    import onnx_ir as ir

    shared = _Shared(compute, len(shapes))
    return [
        _initializer(
            graph, name + suffix, shape, dtype,
            lambda x=suffix, nm=name + suffix: ir.Tensor(shared.part(x), name=nm),
        )
        for suffix, (shape, dtype) in shapes.items()
    ]


def merge_survival(
    checkpoint: Any, plan: Any, layers: Mapping[str, DenseLayer], quantized: Sequence[str],
    options: QuantOptions, float_dtype: np.dtype,
) -> SurvivalReport | None:
    """How much of the merged adapters the quantized weights keep
    (:mod:`loraformat.quant.survival`), as merging into an int4 ONNX base reports it: each merged
    weight of a layer in ``quantized``, W from the checkpoint and W' = W + ΔW through the same
    MatMulNBits quantizer (its scales in ``float_dtype``, as written). Merged layers only, each
    quantized twice more here; ``None`` when no merged weight was quantized."""
    from ..merge.onnx_int4 import ADVICE

    chosen = set(quantized)
    report = SurvivalReport(advice=ADVICE)
    for name, op in (plan.ops.items() if plan is not None else ()):
        layer = layers.get(op.layer_path)
        if op.kind != "weight" or op.layer_path not in chosen or layer is None:
            continue
        w = np.asarray(checkpoint.numpy(name), dtype=np.float32)
        merged = op.apply(np.array(w, copy=True))
        if layer.layout == "in_out":  # the quantizer reads out × in
            w, merged = transposed(w), transposed(merged)

        def quantize(x: np.ndarray) -> matmulnbits.QuantizedWeight:
            q = matmulnbits.quantize(x, bits=options.bits, block_size=options.block_size,
                                     symmetric=options.symmetric)
            scales = q.scales.astype(float_dtype).astype(np.float32)  # what the file holds
            return matmulnbits.QuantizedWeight(q.packed, scales, q.zero_points, q.bits,
                                               q.block_size, q.k)

        figures, _ = measure(name, w, merged, quantize, matmulnbits.dequantize,
                             qtype=f"int{options.bits}")
        report.add(figures)
    return report if report.layers else None


def quantize_dense_layers(
    model: Any, layers: Mapping[str, DenseLayer], options: QuantOptions
) -> list[str]:
    """Replace the dense layers' MatMuls in the onnx_ir ``model`` by MatMulNBits (in place).

    Returns the layer paths quantized, in graph order. Scales take the weight's float dtype.
    """
    import onnx_ir as ir

    graph = model.graph
    done = []
    bits, block = options.bits, options.block_size
    for path, layer in quantized_targets(layers, options)[0].items():
        weight = graph.initializers.get(layer.weight)
        if weight is None or weight.const_value is None:
            continue
        found = _matmuls(weight, layer.layout)
        if found is None:
            continue
        matmuls, transposes = found
        n, k = layer.out_features, layer.in_features
        k_blocks = -(-k // block)
        float_type = weight.const_value.dtype
        source, name, scale_np = weight.const_value, layer.weight, float_type.numpy()
        shapes = {f"_Q{bits}": ((n, k_blocks, block * bits // 8), ir.DataType.UINT8),
                  "_scales": ((n, k_blocks), float_type)}
        if not options.symmetric:
            shapes["_zero_points"] = ((n, -(-k_blocks * bits // 8)), ir.DataType.UINT8)
        inputs = _lazy_parts(
            graph, name, shapes,
            lambda s=source, lay=layer.layout, dt=scale_np: dense_parts(
                s.numpy(), lay, options, dt
            ),
        )
        attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
        if options.accuracy_level:
            attributes["accuracy_level"] = options.accuracy_level
        for node in matmuls:
            new = ir.node(
                "MatMulNBits", [node.inputs[0], *inputs], attributes=attributes,
                domain=MS_DOMAIN, name=(node.name or name) + f"_Q{bits}",
            )
            new.outputs[0].shape = node.outputs[0].shape
            new.outputs[0].type = node.outputs[0].type
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
            )
        for node in transposes:
            if not node.outputs[0].uses():
                graph.remove(node, safe=True)
        if not weight.uses():
            graph.initializers.pop(name)
        done.append(path)
    if done:
        model.opset_imports[MS_DOMAIN] = 1
    return done


def quantize_embeddings(
    model: Any, layers: Mapping[str, DenseLayer], options: QuantOptions
) -> list[str]:
    """Replace every ``Gather`` from an embedding table (a dense layer of kind ``embedding``) by
    ``GatherBlockQuantized`` (in place). Returns the tables' layer paths."""
    import onnx_ir as ir

    graph = model.graph
    done = []
    block, symmetric = options.block_size, options.symmetric
    for path, layer in quantized_targets(layers, options)[1].items():
        weight = graph.initializers.get(layer.weight)
        if weight is None or weight.const_value is None or len(weight.shape or ()) != 2:
            continue
        gathers = [
            use.node for use in weight.uses()
            if use.node.op_type == "Gather" and use.node.domain in ("", "ai.onnx")
            and use.idx == 0 and use.node.attributes.get_int("axis", 0) == 0
        ]
        rows, dim = (int(d) for d in weight.shape)
        if not gathers or dim % block:
            continue
        float_type = weight.const_value.dtype
        source, name, scale_np = weight.const_value, layer.weight, float_type.numpy()
        shapes = {"_Q4": ((rows, dim), ir.DataType.INT4 if symmetric else ir.DataType.UINT4),
                  "_scales": ((rows, dim // block), float_type)}
        if not symmetric:
            shapes["_zero_points"] = ((rows, dim // block), ir.DataType.UINT4)
        data, *params = _lazy_parts(
            graph, name, shapes,
            lambda s=source, dt=scale_np: table_parts(s.numpy(), options, dt),
        )
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block}
        for node in gathers:
            new = ir.node(
                "GatherBlockQuantized", [data, node.inputs[1], *params],
                attributes=attributes, domain=MS_DOMAIN, name=(node.name or name) + "_Q4",
            )
            new.outputs[0].shape = node.outputs[0].shape
            new.outputs[0].type = node.outputs[0].type
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
            )
        if not weight.uses():
            graph.initializers.pop(name)
        done.append(path)
    if done:
        model.opset_imports[MS_DOMAIN] = 1
        model.ir_version = max(model.ir_version or 0, 10)  # INT4/UINT4 tensors
    return done


__all__ = [
    "HEAD_LAYERS",
    "MS_DOMAIN",
    "QuantOptions",
    "dense_parts",
    "merge_survival",
    "quantize_dense_layers",
    "quantize_embeddings",
    "quantized_targets",
    "table_parts",
]
