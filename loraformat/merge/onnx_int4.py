"""ONNX surgery on weights stored quantized in ``com.microsoft::MatMulNBits`` nodes (int4/int8).

A MatMulNBits node is a linear layer whose weight W [N, K] (out × in) is stored blockwise
quantized: B (packed uint8), scales and, when asymmetric, zero points (see
:mod:`loraformat.quant.matmulnbits`). :mod:`loraformat.merge.onnx_surgery` asks :func:`find` for
a layer's weight when the graph has no float initializer for it, and :func:`merge_layer` for the
new initializer values: W is dequantized exactly, merged in float32 by the plan's op, and
requantized with the node's own bits, block size and scheme (symmetric when the node has no zero
points), the survival report measuring what the stored change keeps.

**Names.** A weight ``<P>.weight`` is found as the initializers ``<P>.weight_Q4`` (or ``_Q8``),
``<P>.weight_scales`` and ``<P>.weight_zero_points``: the names ONNX Runtime's
``MatMulNBitsQuantizer`` gives a MatMul's B initializer ``<P>.weight`` and the names
``loraformat export --dtype int4`` writes. ONNX Runtime GenAI's model builder names them after
its own node names (``/model/layers.0/attn/q_proj/MatMul.weight_Q4``), which no plugin's name
table maps; such a graph is refused in one line (:func:`unnamed_message`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..quant import matmulnbits
from ..quant.survival import LayerSurvival, measure
from .plan import TensorOp

OP_TYPE = "MatMulNBits"
MS_DOMAIN = "com.microsoft"
#: What the warning advises when the adapter does not survive int4.
ADVICE = (
    "keep the adapter separate (ONNX LoRA slots: `loraformat export BASE -o x.onnx --lora-slots`, "
    "then switch adapters at run time) or merge into a finer weight (int8, or a float model)"
)
_SUFFIX = re.compile(r"_Q(4|8)$")


@dataclass
class QuantizedLayer:
    """One MatMulNBits weight: its node and the initializers holding it."""

    node: Any  # onnx_ir.Node
    packed: Any  # onnx_ir.Value: B
    scales: Any
    zero_points: Any | None  # None: symmetric
    bits: int
    block_size: int
    k: int
    n: int

    @property
    def qtype(self) -> str:
        """The report's type: int4s/int8s (symmetric) or int4a/int8a (with zero points)."""
        return f"int{self.bits}{'s' if self.zero_points is None else 'a'}"

    def read(self) -> matmulnbits.QuantizedWeight:
        """The stored weight, as the codec takes it (scales in float32)."""
        k_blocks = -(-self.k // self.block_size)
        packed = np.asarray(self.packed.const_value.numpy()).reshape(self.n, k_blocks, -1)
        scales = np.asarray(self.scales.const_value.numpy()).reshape(self.n, k_blocks)
        zp = None
        if self.zero_points is not None:
            zp = np.asarray(self.zero_points.const_value.numpy()).reshape(self.n, -1)
        return matmulnbits.QuantizedWeight(
            packed, scales.astype(np.float32), zp, self.bits, self.block_size, self.k
        )


def quantized_names(initializers: Mapping[str, Any]) -> list[str]:
    """The float weight names the quantized initializers stand for (``X_Q4`` → ``X``), so that
    architecture detection sees a quantized graph's layers."""
    return [name[: m.start()] for name in initializers if (m := _SUFFIX.search(name))]


def has_quantized(model: Any) -> bool:
    """Whether the graph has any MatMulNBits node."""
    return any(node.op_type == OP_TYPE for node in model.graph.all_nodes())


def unnamed_message(candidates: list[str]) -> str:
    """Why a layer of a graph with MatMulNBits nodes was not found (the builder's names)."""
    return (
        f"the graph's MatMulNBits weights are not named after the checkpoint: no initializer "
        f"{candidates[-1] + '.weight_Q4'!r} (ONNX Runtime's MatMulNBitsQuantizer and `loraformat "
        "export --dtype int4` name them <weight>_Q4; names like ONNX Runtime GenAI's builder's "
        "'/model/layers.0/attn/q_proj/MatMul.weight_Q4' are not mapped by any plugin)"
    )


def _attribute(node: Any, name: str) -> int | None:
    attr = node.attributes.get(name)
    return None if attr is None else int(attr.value)


def find(initializers: Mapping[str, Any], weight: str, where: object) -> QuantizedLayer | None:
    """The MatMulNBits weight standing for the float initializer ``weight``, or None."""
    packed = next(
        (initializers[weight + s] for s in ("_Q4", "_Q8") if weight + s in initializers), None
    )
    if packed is None:
        return None
    uses = list(packed.uses())
    nodes = [u.node for u in uses if u.node.op_type == OP_TYPE and u.idx == 1]
    if not nodes or len(nodes) != len(uses):
        raise LoraformatError(
            where, f"{packed.name!r} is not only the B input of MatMulNBits nodes; cannot merge "
            "into it",
        )
    if len(nodes) > 1:
        raise LoraformatError(
            where, f"{packed.name!r} is shared by {len(nodes)} MatMulNBits nodes "
            f"({', '.join(n.name for n in nodes[:3])}); merging would change them all",
        )
    node = nodes[0]
    inputs = list(node.inputs) + [None] * 6
    label = f"MatMulNBits node {node.name!r}"
    if inputs[4] is not None:
        raise LoraformatError(where, f"{label} has a g_idx input (act-order); cannot requantize it")
    attrs = {a: _attribute(node, a) for a in ("K", "N", "bits", "block_size")}
    missing = [a for a, v in attrs.items() if v is None]
    if missing:
        raise LoraformatError(where, f"{label} lacks the attribute(s) {', '.join(missing)}")
    bits, block = attrs["bits"], attrs["block_size"]
    try:
        matmulnbits.check_params(bits, block)
    except ValueError as exc:
        raise LoraformatError(where, f"{label}: {exc}") from None
    for value, what in ((inputs[2], "scales"), (inputs[3], "zero_points")):
        if value is None:
            continue
        if value.const_value is None:
            raise LoraformatError(where, f"{label}: its {what} are not an initializer")
        if len(list(value.uses())) > 1:
            raise LoraformatError(
                where, f"{label}: its {what} {value.name!r} are shared with other nodes; merging "
                "would change them all",
            )
    if inputs[2] is None:
        raise LoraformatError(where, f"{label} has no scales input")
    if inputs[3] is not None and inputs[3].const_value.dtype.numpy() != np.uint8:
        raise LoraformatError(
            where, f"{label}: float zero points cannot be requantized here (only packed uint8)"
        )
    layer = QuantizedLayer(node, packed, inputs[2], inputs[3], bits, block, attrs["K"],
                           attrs["N"])
    k_blocks = -(-layer.k // block)
    sizes = {
        "B": (packed, layer.n * k_blocks * block * bits // 8),
        "scales": (inputs[2], layer.n * k_blocks),
    }
    if inputs[3] is not None:
        sizes["zero_points"] = (inputs[3], layer.n * (-(-k_blocks * bits // 8)))
    for what, (value, size) in sizes.items():
        dims = [int(d) for d in value.const_value.shape]
        if int(np.prod(dims)) != size:
            raise LoraformatError(
                where, f"{label}: its {what} has shape {dims}, not the "
                f"{size} elements K={layer.k}, N={layer.n}, bits={bits}, block_size={block} need",
            )
    return layer


def merge_layer(layer: QuantizedLayer, op: TensorOp, name: str) -> LayerSurvival:
    """Dequantize ``layer``, apply ``op`` (a weight op on [N, K] = out × in) in float32,
    requantize with the layer's parameters and write its initializers back; the survival figures
    of the result."""
    import onnx_ir as ir

    stored = layer.read()
    w = matmulnbits.dequantize(stored)
    merged = op.apply(np.array(w, copy=True))
    symmetric = layer.zero_points is None
    scale_dtype = layer.scales.const_value.dtype.numpy()

    def quantize(x: np.ndarray) -> matmulnbits.QuantizedWeight:
        q = matmulnbits.quantize(x, bits=layer.bits, block_size=layer.block_size,
                                 symmetric=symmetric)
        # Scales are stored in the model's dtype: measure what the file will hold.
        scales = q.scales.astype(scale_dtype).astype(np.float32)
        return matmulnbits.QuantizedWeight(q.packed, scales, q.zero_points, q.bits,
                                           q.block_size, q.k)

    figures, new = measure(name, w, merged, quantize, matmulnbits.dequantize,
                           qtype=layer.qtype, stored=w)
    parts = [(layer.packed, new.packed), (layer.scales, new.scales.astype(scale_dtype))]
    if layer.zero_points is not None:
        parts.append((layer.zero_points, new.zero_points))
    for value, array in parts:
        shape = tuple(int(d) for d in value.const_value.shape)
        value.const_value = ir.Tensor(
            np.ascontiguousarray(array.reshape(shape)), name=value.name
        )
    return figures


__all__ = [
    "ADVICE", "QuantizedLayer", "find", "has_quantized", "merge_layer", "quantized_names",
    "unnamed_message",
]
