"""The KV-cache decoder graph written directly from a decoder description, op by op.

The built-in decoder families describe themselves with one ``DecoderSpec``
(:mod:`loraformat.architecture.decoder`: sizes, norms, ropes, windows, soft-caps). From it
this module writes the graph ONNX Runtime's fused kernels run, with no torch trace: per layer

* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (the residual add
  fused into the next norm; Gemma's ``(1 + w)`` norms as a weight ``1 + w`` written at export);
* one ``MatMul`` for the packed q/k/v projection (:mod:`.layout` packs the streamed, merged
  weights), one each for gate and up (as ONNX Runtime GenAI's builder writes them: packing them
  saves less in the product than the ``Split`` it needs costs, measured by
  ``tools/bench_genai_decode.py``; Phi-3's fused ``gate_up_proj`` stays one, split after),
  ``MatMulNBits`` for int4/int8;
* ``GroupQueryAttention`` (``com.microsoft``) with the rotary embedding inside (``do_rotary``,
  cos/sin caches computed here from the spec's ropes; LongRoPE's two caches chosen by an ``If``
  on the total length, as transformers chooses them), the KV cache, the sliding window
  (``local_window_size``), the score soft-cap (``softcap``) and the scale; per-head q/k norms
  are ``SimplifiedLayerNormalization`` on the [.., heads, head_dim] view before it.

Padding is transformers' layout, left or right: each row's keys sit at the attention mask's
columns, pad columns included, so ``seqlens_k`` is the mask's width − 1 for every row and the pad
columns are masked by GroupQueryAttention's additive ``attention_bias`` (a window counts columns,
as transformers' does). The rotary positions are the caller's ``position_ids``, shifted by each
row's leading padding: on a prompt GroupQueryAttention rotates every row from one start
position by column, which such a shift keeps consistent with the later steps (only differences
of positions within a row count). LongRoPE picks its table by the mask's width.

The interface is :mod:`.decoder`'s (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.N.key/value`` → ``logits``, ``present.N.key/value``), so the same runtime code
runs an emitted or a traced decoder. :func:`unsupported` says why a spec cannot be emitted
(a field this module does not know set to anything but its default, an activation or rope it
cannot write); such models take the traced path, so an unknown feature never gives a wrong graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..architecture.decoder import FULL, SLIDING, kv_cache
from ..architecture.decoder.spec import fields_changed
from ..checkpoint import Checkpoint
from ..errors import LoraformatError
from ..merge.plan import MergePlan
from .layout import WeightSource, packed_rows, packed_transposed, plus_one
from .quantize import MS_DOMAIN, QuantOptions, dense_parts

#: DecoderSpec fields this emitter writes. Any other field (a family added later) must hold its
#: default value, else :func:`unsupported` refuses the spec.
KNOWN_FIELDS = frozenset({
    "family", "n_layer", "n_head", "n_kv", "head_dim", "eps", "ropes", "rope_of", "windows",
    "activation", "fused_qkv", "fused_gate_up", "qk_norm", "gemma_norm", "sandwich_norm",
    "embed_scale", "attn_scale", "attn_softcap", "final_softcap",
    "moe", "attn_sinks",  # mixture-of-experts decoders (plugins/_moe.py's MoeDecoderSpec)
    # per-layer kinds, shapes and caches: written when they are what the fields above imply
    # (:func:`_layer_fields` refuses the rest)
    "layer_kinds", "layer_shapes", "caches",
})
#: Rope fields written into the cos/sin caches.
KNOWN_ROPE_FIELDS = frozenset({"inv_freq", "dim", "scaling", "long_inv_freq", "threshold"})
#: transformers' activation names → how the gate is activated.
ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
FLOAT_TYPES = ("float32", "float16", "bfloat16")


def _changed_fields(obj: Any, known: frozenset[str]) -> list[str]:
    """Fields of the dataclass ``obj`` outside ``known`` whose value is not their default."""
    return fields_changed(obj, lambda name: name not in known)


def _layer_fields(spec: Any) -> str | None:
    """Why the per-layer description (kinds, shapes, caches) is beyond the emitter — softmax
    attention, full or sliding as the windows say, one shape, attention's keys and values in
    every layer — or None when it is within it."""
    kv = kv_cache(spec.n_kv, spec.head_dim)
    for i, cache in enumerate(spec.layer_caches()):
        kind = spec.kind_of(i)
        if kind != (FULL if spec.windows[i] is None else SLIDING):
            return f"layer {i} is {kind!r}"
        if spec.shape_of_layer(i) != (spec.n_head, spec.n_kv, spec.head_dim):
            return f"layer {i} has its own head shape {spec.shape_of_layer(i)}"
        if cache != kv:
            return f"layer {i} carries {', '.join(t.name for t in cache.tensors) or 'no cache'}"
    return None


def unsupported(spec: Any, config: Mapping[str, Any]) -> str | None:
    """Why ``spec`` (a ``DecoderSpec``) cannot be emitted, or None when it can."""
    if not dataclasses.is_dataclass(spec):
        return "the architecture's spec is not a decoder description"
    if hasattr(spec, "layer_caches"):
        why = _layer_fields(spec)
        if why is not None:
            return why
    changed = _changed_fields(spec, KNOWN_FIELDS)
    if changed:
        return (f"the decoder description sets {', '.join(changed)}, which the emitter does "
                "not write")
    if spec.head_dim % 16:
        # ONNX Runtime's CPU GroupQueryAttention refuses other head sizes at run time
        return f"head size {spec.head_dim} is not a multiple of 16 (GroupQueryAttention)"
    for key, rope in spec.ropes.items():
        changed = _changed_fields(rope, KNOWN_ROPE_FIELDS)
        if changed:
            return f"rope {key!r} sets {', '.join(changed)}, which the emitter does not write"
        if rope.dim == 0:
            return f"rope {key!r} rotates nothing (layers without rotary)"
        if rope.dim % 16 or rope.dim > spec.head_dim:
            # GroupQueryAttention's cos/sin caches: [positions, rotary/2], rotary/2 % 8 == 0
            return f"rope {key!r} rotates {rope.dim} of {spec.head_dim} channels (GroupQuery" \
                "Attention rotates a multiple of 16)"
    if str(spec.activation) not in ACTIVATIONS:
        return f"activation {spec.activation!r}"
    if config.get("use_bidirectional_attention"):
        return "bidirectional attention"
    if len(spec.windows) != spec.n_layer or len(spec.rope_of) != spec.n_layer:
        return "per-layer windows or ropes do not cover every layer"
    if spec.n_head % spec.n_kv:
        return f"{spec.n_head} query heads are not a multiple of {spec.n_kv} KV heads"
    return None


# -- the graph ------------------------------------------------------------------------------------


class _Builder:
    """Nodes and initializers of one onnx_ir graph, named by a running counter."""

    def __init__(self, float_type: Any,
                 progress: Callable[[int, int], None] | None = None) -> None:
        import onnx_ir as ir

        self.ir = ir
        self.progress = progress
        self.lazies = 0
        self.written = 0
        self.float = float_type
        self.nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self.count = 0

    def op(
        self, op_type: str, inputs: Sequence[Any], outputs: int | Sequence[str] = 1,
        domain: str = "", unused: Sequence[int] = (), **attributes: Any,
    ) -> Any:
        """One node; ``unused``: indices of optional outputs written as empty names."""
        ir = self.ir
        self.count += 1
        name = f"/{op_type}_{self.count}"
        names = (
            [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int)
            else list(outputs)
        )
        attrs = {k: v for k, v in attributes.items() if v is not None}
        node = ir.node(op_type, list(inputs), attributes=attrs, domain=domain, name=name,
                       num_outputs=len(names))
        for j, (value, out_name) in enumerate(zip(node.outputs, names, strict=True)):
            value.name = "" if j in unused else out_name
        self.nodes.append(node)
        return node.outputs[0] if len(names) == 1 else tuple(node.outputs)

    def const(self, name: str, array: np.ndarray) -> Any:
        """A small initializer holding ``array``."""
        if name in self.initializers:
            return self.initializers[name]
        ir = self.ir
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.initializers[name] = value
        return value

    def ints(self, *values: int) -> Any:
        return self.const("const_i64_" + "_".join(str(v) for v in values).replace("-", "m"),
                          np.array(values, np.int64))

    def scalar(self, value: float) -> Any:
        """A float scalar in the graph's float type."""
        array = np.array(value, np.float32).astype(self.float.numpy())
        return self.const(f"const_f_{value!r}", array)

    def lazy(self, name: str, shape: Sequence[int], dtype: Any,
             compute: Callable[[], np.ndarray]) -> Any:
        """An initializer whose value is computed only while it is written (streamed)."""
        ir = self.ir
        self.lazies += 1

        def make() -> Any:
            tensor = ir.Tensor(np.ascontiguousarray(compute()), name=name)
            self.written += 1
            if self.progress is not None:
                self.progress(min(self.written, self.lazies), self.lazies)
            return tensor

        value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
        value.const_value = ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(list(shape)),
                                          name=name)
        self.initializers[name] = value
        return value


@dataclass(frozen=True)
class EmitOptions:
    """What is emitted: the float type of activations and float weights, and the quantization of
    the dense layers (None: float)."""

    dtype: str = "float32"
    quant: QuantOptions | None = None
    #: rows of each cos/sin cache: positions the graph can rotate (the config's context length)
    max_positions: int = 4096
    opset: int = 18


def _rope_caches(rope: Any, inv_freq: Any, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [rows, dim/2] of ``inv_freq`` scaled by the rope's factor, as transformers
    computes them in fp32."""
    freqs = np.outer(np.arange(rows, dtype=np.float32), np.asarray(inv_freq, np.float32))
    return (np.cos(freqs) * np.float32(rope.scaling)).astype(np.float32), (
        np.sin(freqs) * np.float32(rope.scaling)
    ).astype(np.float32)


def emit_decoder(
    spec: Any,
    checkpoint: Checkpoint,
    plan: MergePlan | None,
    options: EmitOptions,
    progress: Callable[[int, int], None] | None = None,
    slots: Sequence[str] = (),
) -> Any:
    """The onnx_ir model of the KV-cache decoder ``spec`` describes, its weights lazy: each read
    from ``checkpoint`` through ``plan`` (merged), laid out (packed, transposed, quantized) and
    cast only while it is written.

    ``slots``: layer paths that get a LoRA slot (:mod:`.slots`' convention: inputs
    ``P.lora_A`` [in, rank_i] and ``P.lora_B`` [rank_i, out], in the float type, after the
    model's own inputs, in this order; ``y += (x·A)·B``). A packed projection's output is split
    per layer where one of its layers has a slot, and each part gets its own term."""
    import onnx_ir as ir

    float_np = {"float32": np.float32, "float16": np.float16}.get(options.dtype)
    if options.dtype == "bfloat16":
        import ml_dtypes

        float_np = ml_dtypes.bfloat16
    float_type = ir.DataType.from_numpy(np.dtype(float_np))
    b = _Builder(float_type, progress)
    source = WeightSource(checkpoint, plan)
    prefix = source.prefix
    quant = options.quant
    n_head, n_kv, hd = spec.n_head, spec.n_kv, spec.head_dim
    embed_name = prefix + "embed_tokens.weight"
    vocab, d = (int(x) for x in checkpoint.info(embed_name).shape)

    def cast(array: np.ndarray) -> np.ndarray:
        return np.asarray(array, float_np)  # no copy when it is already float_np

    def float_weight(name: str, shape: Sequence[int], compute: Callable[[], np.ndarray]) -> Any:
        return b.lazy(name, shape, float_type, lambda: cast(compute()))

    def norm_weight(path: str) -> Any:
        name = path + ".weight"
        (dim,) = (int(x) for x in checkpoint.info(name).shape)
        if spec.gemma_norm:
            return float_weight(name + ".plus_one", [dim], lambda: plus_one(source.read(name)))
        return float_weight(name, [dim], lambda: source.read(name))

    def packed(paths: Sequence[str], suffix: str) -> Callable[[], np.ndarray] | None:
        """The biases ``path + suffix`` packed along their rows, read when called; None when
        the checkpoint has none."""
        names = [p + suffix for p in paths]
        if not source.has(names[0]):
            return None
        return lambda: packed_rows(source, names)

    def dense(x: Any, path: str, parts: Sequence[str], bias: Callable[[], np.ndarray] | None,
              quantize: bool = True) -> Any:
        """x · Wᵀ (+ bias), W the weights of the layers ``parts`` packed along their rows."""
        names = [p + ".weight" for p in parts]
        n = sum(int(checkpoint.info(m).shape[0]) for m in names)
        k = int(checkpoint.info(names[0]).shape[1])

        def weight_t() -> np.ndarray:  # [k, n]
            return packed_transposed(source, names)

        if quant is not None and quantize:
            bits, block = quant.bits, quant.block_size
            k_blocks = -(-k // block)
            part = _parts_once(lambda: dense_parts(weight_t(), "in_out", quant,
                                                   np.dtype(np.float32)))
            base = path + ".MatMul.weight"
            inputs = [
                b.lazy(base + f"_Q{bits}", [n, k_blocks, block * bits // 8], ir.DataType.UINT8,
                       lambda: part(f"_Q{bits}")),
                b.lazy(base + "_scales", [n, k_blocks], ir.DataType.FLOAT,
                       lambda: part("_scales")),
            ]
            if not quant.symmetric:
                inputs.append(b.lazy(base + "_zero_points", [n, -(-k_blocks * bits // 8)],
                                     ir.DataType.UINT8, lambda: part("_zero_points")))
            y = b.op("MatMulNBits", [x, *inputs], domain=MS_DOMAIN, K=k, N=n, bits=bits,
                     block_size=block, accuracy_level=quant.accuracy_level or None)
        else:
            y = b.op("MatMul", [x, float_weight(path + ".MatMul.weight", [k, n], weight_t)])
        if bias is not None:
            y = b.op("Add", [y, float_weight(path + ".bias", [n], bias)])
        return y

    # -- inputs and the attention-mask subgraph --
    def value(name: str, dtype: Any, shape: Sequence[Any]) -> Any:
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))

    slot_index = {path: i for i, path in enumerate(slots)}
    slot_inputs: dict[int, list[Any]] = {}

    def with_slots(x: Any, y: Any, parts: Sequence[str]) -> list[Any]:
        """``y`` (x through the packed layers ``parts``) as one output per layer, each with its
        slot's term where it has one; unsplit ([y]) when no part has a slot."""
        if not any(p in slot_index for p in parts):
            return [y]
        sizes = [int(checkpoint.info(p + ".weight").shape[0]) for p in parts]
        k = int(checkpoint.info(parts[0] + ".weight").shape[1])
        outs = list(b.op("Split", [y, b.ints(*sizes)], outputs=len(parts), axis=-1)) \
            if len(parts) > 1 else [y]
        for j, (path, n) in enumerate(zip(parts, sizes, strict=True)):
            if path not in slot_index:
                continue
            i = slot_index[path]
            lora_a = value(path + ".lora_A", float_type, [k, f"rank_{i}"])
            lora_b = value(path + ".lora_B", float_type, [f"rank_{i}", n])
            slot_inputs[i] = [lora_a, lora_b]
            term = b.op("MatMul", [b.op("MatMul", [x, lora_a]), lora_b])
            outs[j] = b.op("Add", [outs[j], term])
        return outs

    input_ids = value("input_ids", ir.DataType.INT64, ["batch", "sequence"])
    attention_mask = value("attention_mask", ir.DataType.INT64, ["batch", "total_sequence"])
    position_ids = value("position_ids", ir.DataType.INT64, ["batch", "sequence"])
    pasts = []
    for i in range(spec.n_layer):
        for kind in ("key", "value"):
            pasts.append(value(f"past_key_values.{i}.{kind}", float_type,
                               ["batch", n_kv, "past_sequence", hd]))
    # The keys sit at the mask's columns, padding included, as in transformers' cache: each
    # row's cache is the mask's width (seqlens_k = width - 1), padding columns are masked by an
    # additive attention_bias [batch, 1, sequence, width], so left and right padding both work.
    mask_shape = b.op("Shape", [attention_mask])
    batch_1d = b.op("Slice", [mask_shape, b.ints(0), b.ints(1)])
    total_1d = b.op("Slice", [mask_shape, b.ints(1), b.ints(2)])
    sequence_1d = b.op("Slice", [b.op("Shape", [input_ids]), b.ints(1), b.ints(2)])
    total_len = b.op("Squeeze", [total_1d, b.ints(0)])
    total = b.op("Cast", [total_len], to=ir.DataType.INT32)
    seqlens = b.op("Expand", [b.op("Cast", [b.op("Sub", [total_1d, b.ints(1)])],
                                   to=ir.DataType.INT32), batch_1d])
    padding = b.op("Cast", [b.op("Equal", [attention_mask, b.ints(0)])], to=float_type)
    bias = b.op("Expand", [
        b.op("Unsqueeze", [b.op("Mul", [padding, b.scalar(float(np.finfo(float_np).min))]),
                           b.ints(1, 2)]),
        b.op("Concat", [batch_1d, b.ints(1), sequence_1d, total_1d], axis=0)])
    # Rotary positions. On a prompt (empty past) GroupQueryAttention rotates every row from
    # position_ids[0, 0] on, by cache column: it is given 0 there, so a row's keys are rotated
    # by column, and later steps by the caller's position plus the row's leading padding (its
    # first real column); within a row only the differences count, and those are the caller's.
    leading = b.op("ArgMax", [attention_mask], axis=1, keepdims=1)
    shifted = b.op("Add", [position_ids, leading])
    prompt = b.op("Cast", [b.op("Equal", [total_1d, sequence_1d])], to=ir.DataType.INT64)
    rotary_positions = b.op("Sub", [shifted, b.op("Mul", [b.op("Slice", [
        shifted, b.ints(0, 0), b.ints(1, 1), b.ints(0, 1)]), prompt])])

    # -- rotary caches: one (cos, sin) pair per rope, LongRoPE's chosen by an If --
    caches: dict[str, tuple[Any, Any]] = {}
    for key in sorted(spec.ropes):
        rope = spec.ropes[key]
        tag = f"rope{sorted(spec.ropes).index(key)}"
        rows = max(options.max_positions, int(rope.threshold or 0))
        cos, sin = _rope_caches(rope, rope.inv_freq, rows)
        cos_v = b.const(f"{tag}.cos_cache", cos.astype(float_np))
        sin_v = b.const(f"{tag}.sin_cache", sin.astype(float_np))
        if rope.long_inv_freq is not None:
            long_cos, long_sin = _rope_caches(rope, rope.long_inv_freq, rows)
            long_c = b.const(f"{tag}.cos_cache_long", long_cos.astype(float_np))
            long_s = b.const(f"{tag}.sin_cache_long", long_sin.astype(float_np))
            longer = b.op("Greater", [total_len, b.const(
                f"{tag}.threshold", np.array(int(rope.threshold), np.int64))])
            cos_v, sin_v = _choose(b, longer, (long_c, long_s), (cos_v, sin_v), tag)
        caches[key] = (cos_v, sin_v)

    # -- embedding --
    table = float_weight(embed_name, [vocab, d], lambda: source.read(embed_name))
    x = b.op("Gather", [table, input_ids], axis=0)
    if spec.embed_scale is not None:
        x = b.op("Mul", [x, b.scalar(float(spec.embed_scale))])

    # -- layers --
    presents = []
    pending: Any = None  # the output to add to the residual before the next norm
    residual = x
    q_size, kv_size = n_head * hd, n_kv * hd
    scale = spec.attn_scale if spec.attn_scale is not None else hd**-0.5

    def add_norm(update: Any, path: str) -> Any:
        """norm(residual + update) (update None: norm(residual)); the sum becomes the residual."""
        nonlocal residual
        w = norm_weight(path)
        if update is None:
            return b.op("SimplifiedLayerNormalization", [residual, w], axis=-1,
                        epsilon=spec.eps, stash_type=1)
        # outputs 1 and 2 (mean, inverse std) left empty: the kernel then skips writing them
        out, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [update, residual, w],
                                   outputs=4, unused=(1, 2), domain=MS_DOMAIN,
                                   epsilon=spec.eps)
        return out

    def gated_mlp(h: Any, mlp: str) -> Any:
        """The gated MLP under ``mlp`` (a block's, or Qwen2-MoE's shared expert)."""
        if spec.fused_gate_up:  # Phi-3's gate_up_proj: one layer, split after
            parts = [mlp + "gate_up_proj"]
            (gate_up,) = with_slots(h, dense(h, parts[0], parts, packed(parts, ".bias")), parts)
            inner = int(checkpoint.info(parts[0] + ".weight").shape[0]) // 2
            gate, up = b.op("Split", [gate_up, b.ints(inner, inner)], outputs=2, axis=-1)
        else:
            gate, up = (with_slots(h, dense(h, p, [p], packed([p], ".bias")), [p])[0]
                        for p in (mlp + "gate_proj", mlp + "up_proj"))
        act = ACTIVATIONS[str(spec.activation)]
        if act == "silu":
            gate = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
        elif act == "gelu_tanh":
            gate = b.op("FastGelu", [gate], domain=MS_DOMAIN)
        else:
            gate = b.op("Gelu", [gate], domain=MS_DOMAIN)
        down_parts = [mlp + "down_proj"]
        hidden = b.op("Mul", [gate, up])
        (out,) = with_slots(hidden, dense(hidden, mlp + "down_proj", down_parts,
                                          packed(down_parts, ".bias")), down_parts)
        return out

    def plain_norm(x: Any, path: str) -> Any:
        return b.op("SimplifiedLayerNormalization", [x, norm_weight(path)], axis=-1,
                    epsilon=spec.eps, stash_type=1)

    for i in range(spec.n_layer):
        block = f"{prefix}layers.{i}."
        attn, mlp = block + "self_attn.", block + "mlp."
        h = add_norm(pending, block + "input_layernorm")
        # packed q/k/v
        if spec.fused_qkv:
            parts = [attn + "qkv_proj"]
        else:
            parts = [attn + "q_proj", attn + "k_proj", attn + "v_proj"]
        qkv = with_slots(h, dense(h, attn + "qkv_proj", parts, packed(parts, ".bias")), parts)
        if len(qkv) == 1 and spec.qk_norm:  # Phi-3-style fused layer or no slot: split here
            qkv = list(b.op("Split", [qkv[0], b.ints(q_size, kv_size, kv_size)], outputs=3,
                            axis=-1))
        if spec.qk_norm:
            qkv[0] = _head_norm(b, qkv[0], norm_weight(attn + "q_norm"), hd, q_size, spec.eps)
            qkv[1] = _head_norm(b, qkv[1], norm_weight(attn + "k_norm"), hd, kv_size, spec.eps)
        qkv_inputs = qkv if len(qkv) == 3 else [qkv[0], None, None]
        cos, sin = caches[spec.rope_of[i]]
        window = spec.windows[i]
        outputs = ["", f"present.{i}.key", f"present.{i}.value"]
        outputs[0] = f"/layers.{i}/attn/GroupQueryAttention/output_0"
        # gpt-oss's per-head sinks: GroupQueryAttention's head_sink (after attention_bias)
        sinks_name = attn + "sinks"
        sinks = [float_weight(sinks_name, [n_head], lambda name=sinks_name: source.read(
            name))] if getattr(spec, "attn_sinks", False) else []
        attended, present_k, present_v = b.op(
            "GroupQueryAttention",
            [*qkv_inputs, pasts[2 * i], pasts[2 * i + 1], seqlens, total, cos, sin,
             rotary_positions, bias, *sinks],
            outputs=outputs, domain=MS_DOMAIN, num_heads=n_head, kv_num_heads=n_kv,
            scale=float(scale), softcap=float(spec.attn_softcap or 0.0),
            local_window_size=int(window) if window is not None else -1,
            do_rotary=1, rotary_interleaved=0,
        )
        presents += [present_k, present_v]
        o_parts = [attn + "o_proj"]
        (attended,) = with_slots(attended, dense(attended, attn + "o_proj", o_parts,
                                                 packed(o_parts, ".bias")), o_parts)
        # MLP
        if spec.sandwich_norm:
            attended = plain_norm(attended, block + "post_attention_layernorm")
            h = add_norm(attended, block + "pre_feedforward_layernorm")
        else:
            h = add_norm(attended, block + "post_attention_layernorm")
        moe = getattr(spec, "moe", None)
        if moe is not None and moe.routed[i]:
            routed = [block + moe.router, block + (moe.shared_gate or moe.router)] + [
                block + t.split("{e}")[0] for st in (moe.gate_up, moe.down)
                for t in (st.per_expert or (st.parameter,))]
            slotted = [p for p in slot_index if p.startswith(tuple(routed))]
            if slotted:
                raise LoraformatError(None, (
                    f"{slotted[0]}: ONNX Runtime's MoE/QMoE ops take no LoRA on the router or "
                    "the experts: give slots to the attention (--targets q_proj,v_proj) and "
                    "merge the expert LoRA"))
            out = _moe_block(b, h, block, moe, source, options, dense, float_weight)
            if moe.shared_expert is not None:
                shared = gated_mlp(h, block + moe.shared_expert + ".")
                gate = dense(h, block + moe.shared_gate, [block + moe.shared_gate],
                             packed([block + moe.shared_gate], ".bias"), quantize=False)
                out = b.op("Add", [out, b.op("Mul", [b.op("Sigmoid", [gate]), shared])])
        else:
            out = gated_mlp(h, mlp)
        if spec.sandwich_norm:
            out = plain_norm(out, block + "post_feedforward_layernorm")
        pending = out

    # -- final norm and head --
    h = add_norm(pending, prefix + "norm")
    tied = not source.has("lm_head.weight")
    head_quant = quant is not None and quant.lm_head is not False  # None: quantized
    head_name = embed_name if tied else "lm_head.weight"
    head_bias = packed(["lm_head"], ".bias")
    if tied and not head_quant:
        # x · Eᵀ straight from the embedding table: Gemm with transB, no second copy of it
        flat = b.op("Reshape", [h, b.ints(-1, d)])
        logits = b.op("Gemm", [flat, table], transB=1)
        if head_bias is not None:
            logits = b.op("Add", [logits, float_weight("lm_head.bias", [vocab], head_bias)])
        shape = b.op("Concat", [b.op("Shape", [input_ids]), b.ints(vocab)], axis=0)
        logits = b.op("Reshape", [logits, shape])
    else:
        logits = dense(h, "lm_head", [head_name.removesuffix(".weight")], head_bias,
                       quantize=head_quant)
    if "lm_head" in slot_index:
        if tied:
            raise ValueError("a tied head has no lm_head layer to give a slot")
        (logits,) = with_slots(h, logits, ["lm_head"])
    if spec.final_softcap is not None:
        cap = b.scalar(float(spec.final_softcap))
        logits = b.op("Mul", [b.op("Tanh", [b.op("Div", [logits, cap])]), cap])
    if float_type != ir.DataType.FLOAT:
        logits = b.op("Cast", [logits], to=ir.DataType.FLOAT)
    logits.name = "logits"
    logits.type = ir.TensorType(ir.DataType.FLOAT)
    logits.shape = ir.Shape(["batch", "sequence", vocab])
    for i, present in enumerate(presents):
        present.type = ir.TensorType(float_type)
        present.shape = ir.Shape(["batch", n_kv, "total_sequence", hd])
        present.name = f"present.{i // 2}.{'key' if i % 2 == 0 else 'value'}"

    graph = ir.Graph(
        [input_ids, attention_mask, position_ids, *pasts,
         *(v for i in sorted(slot_inputs) for v in slot_inputs[i])],
        [logits, *presents], nodes=b.nodes,
        initializers=list(b.initializers.values()),
        opset_imports={"": options.opset, MS_DOMAIN: 1}, name=f"{spec.family} decoder",
    )
    return ir.Model(graph, ir_version=10, producer_name="loraformat")


def _parts_once(compute: Callable[[], dict[str, np.ndarray]]) -> Callable[[str], np.ndarray]:
    """``part(suffix)`` for initializers computed together (a weight's quantized parts): the
    first call computes them all, the last of them frees them, so each lazy initializer of the
    group is written without quantizing the weight again or keeping it afterwards."""
    shared: dict[str, np.ndarray] = {}
    left = [0]

    def part(suffix: str) -> np.ndarray:
        if not shared:
            shared.update(compute())
            left[0] = len(shared)
        value = shared[suffix]
        left[0] -= 1
        if left[0] == 0:
            shared.clear()
        return value

    return part


def _interleave(rows: np.ndarray) -> np.ndarray:
    """[gate; up] concatenated along axis 0 → rows interleaved g0, u0, g1, u1, … (the fused
    SwiGLU layout ``swiglu_fusion=1`` reads)."""
    half = rows.shape[0] // 2
    return np.stack([rows[:half], rows[half:]], axis=1).reshape(rows.shape)


def _expert_matrices(source: WeightSource, block: str, storage: Any, experts: int,
                     suffix: str, fused: bool) -> Iterator[np.ndarray]:
    """Each expert's merged weight (``suffix`` ".weight", [out, in]) or bias ("_bias", [out])
    in turn, as ONNX Runtime's MoE reads it: fused gate/up rows interleaved. Per-expert
    checkpoints are read one expert tensor at a time; a stacked checkpoint tensor (gpt-oss) is
    one tensor, read once."""
    if storage.per_expert:
        tail = ".bias" if suffix == "_bias" else ".weight"
        for e in range(experts):
            rows = packed_rows(source, [block + t.format(e=e) + tail for t in storage.per_expert])
            yield _interleave(rows) if fused else rows
        return
    stack = source.read(block + storage.parameter + ("_bias" if suffix == "_bias" else ""))
    for matrix in stack:
        if matrix.ndim == 2 and storage.layout == "in_out":
            matrix = matrix.T
        yield _interleave(matrix) if fused and not storage.interleaved else matrix


def _stacked(matrices: Iterable[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """``matrices`` written one by one into one [E, …] fp32 array (no list of them kept)."""
    out = np.empty(tuple(shape), np.float32)
    for e, matrix in enumerate(matrices):
        out[e] = matrix
    return out


def _moe_block(b: _Builder, h: Any, block: str, moe: Any, source: WeightSource,
               options: EmitOptions, dense: Callable[..., Any],
               float_weight: Callable[..., Any]) -> Any:
    """The routed MLP of one block: the router's logits (float, never quantized: a rounded
    logit can change the chosen experts) and ONNX Runtime's ``MoE`` (float experts) or ``QMoE``
    (int4/int8 blockwise, MatMulNBits' encoding per expert) with the SwiGLU fused (gate/up rows
    interleaved, ``swiglu_fusion=1``), as ONNX Runtime GenAI's builder writes them."""
    ir = b.ir
    experts, quant = moe.experts, options.quant
    router = block + moe.router
    logits = dense(h, router, [router],
                   (lambda: source.read(router + ".bias")) if source.has(router + ".bias")
                   else None, quantize=False)
    probs = b.op("Reshape", [logits, b.ints(-1, experts)])
    fc_inputs: list[Any] = []
    zero_points: list[Any] = []
    for storage, fused in ((moe.gate_up, True), (moe.down, False)):
        base = block + storage.parameter
        rows_of = source.checkpoint.info
        if storage.per_expert:
            shapes = [rows_of(block + t.format(e=0) + ".weight").shape for t in storage.per_expert]
            n, k = sum(int(s[0]) for s in shapes), int(shapes[0][1])
        else:
            _, a, c = (int(x) for x in rows_of(base).shape)
            n, k = (c, a) if storage.layout == "in_out" else (a, c)

        def each(suffix: str, storage: Any = storage, fused: bool = fused
                 ) -> Iterator[np.ndarray]:
            return _expert_matrices(source, block, storage, experts, suffix, fused)

        bias = float_weight(base + ".bias", [experts, n], lambda each=each, n=n: _stacked(
            each("_bias"), [experts, n])) if _expert_rows_exist(source, block, storage) else None
        if quant is None:
            fc_inputs += [float_weight(base + ".weight", [experts, n, k],
                                       lambda each=each, n=n, k=k: _stacked(
                                           each(".weight"), [experts, n, k])), bias]
            continue
        assert quant is not None
        bits, size = quant.bits, quant.block_size
        if k % size:
            raise LoraformatError(source.checkpoint.path, (
                f"{base}: QMoE quantizes in blocks of {size} along the input, which {k} "
                "features do not fill (choose --block-size dividing the hidden and expert "
                "sizes)"))
        blocks = k // size

        def stacked_parts(each: Callable[[str], Iterator[np.ndarray]] = each
                          ) -> dict[str, np.ndarray]:
            # each expert quantized as MatMulNBits quantizes [N, K], as it is read
            out: dict[str, np.ndarray] = {}
            for e, matrix in enumerate(each(".weight")):
                for key, value in dense_parts(matrix, "out_in", quant,
                                              np.dtype(np.float32)).items():
                    out.setdefault(key, np.empty((experts, *value.shape), value.dtype))[e] = value
            return out

        part = _parts_once(stacked_parts)

        packed_q = b.lazy(base + f".qweight_Q{bits}", [experts, n, k * bits // 8],
                          ir.DataType.UINT8,
                          lambda part=part, n=n, q=f"_Q{bits}": part(q).reshape(experts, n, -1))
        scales = b.lazy(base + ".scales", [experts, n, blocks], ir.DataType.FLOAT,
                        lambda part=part: part("_scales"))
        fc_inputs += [packed_q, scales, bias]
        if not quant.symmetric:
            zero_points.append(b.lazy(
                base + ".zero_points", [experts, n, -(-blocks * bits // 8)], ir.DataType.UINT8,
                lambda part=part: part("_zero_points")))
    activation = dict(
        k=moe.top_k, normalize_routing_weights=int(moe.normalize), activation_type="swiglu",
        swiglu_fusion=1, activation_alpha=float(moe.alpha), activation_beta=float(moe.beta),
        swiglu_limit=None if moe.limit is None else float(moe.limit),
    )
    if quant is None:
        return b.op("MoE", [h, probs, *fc_inputs], domain=MS_DOMAIN, **activation)
    # QMoE: fc3 (weight, scales, bias) absent, then fc1/fc2 zero points
    inputs = [h, probs, *fc_inputs, None, None, None, *zero_points]
    return b.op("QMoE", inputs, domain=MS_DOMAIN, expert_weight_bits=quant.bits,
                block_size=quant.block_size, accuracy_level=quant.accuracy_level or None,
                **activation)


def _expert_rows_exist(source: WeightSource, block: str, storage: Any) -> bool:
    """Whether the expert stack ``storage`` has biases (gpt-oss)."""
    if storage.per_expert:
        return source.has(block + storage.per_expert[0].format(e=0) + ".bias")
    return source.has(block + storage.parameter + "_bias")


def _head_norm(b: _Builder, x: Any, weight: Any, hd: int, size: int, eps: float) -> Any:
    """RMSNorm over each head of x [batch, seq, heads·hd] (q/k norms)."""
    heads = b.op("Reshape", [x, b.ints(0, 0, -1, hd)])
    normed = b.op("SimplifiedLayerNormalization", [heads, weight], axis=-1, epsilon=eps,
                  stash_type=1)
    return b.op("Reshape", [normed, b.ints(0, 0, size)])


def _choose(b: _Builder, cond: Any, then: tuple[Any, Any], otherwise: tuple[Any, Any],
            tag: str) -> tuple[Any, Any]:
    """``then`` if the boolean scalar ``cond`` else ``otherwise``, by an If whose branches each
    return their pair (only the chosen tables are touched at run time)."""
    ir = b.ir

    def branch(pair: tuple[Any, Any], name: str) -> Any:
        nodes, outs = [], []
        for v in pair:
            node = ir.node("Identity", [v], name=f"{tag}/{name}/{v.name}")
            node.outputs[0].name = f"{tag}/{name}/{v.name}/out"
            node.outputs[0].type = v.type
            node.outputs[0].shape = v.shape
            nodes.append(node)
            outs.append(node.outputs[0])
        return ir.Graph([], outs, nodes=nodes, name=f"{tag}_{name}")

    b.count += 1
    node = ir.node("If", [cond], attributes={
        "then_branch": ir.AttrGraph("then_branch", branch(then, "long")),
        "else_branch": ir.AttrGraph("else_branch", branch(otherwise, "short")),
    }, num_outputs=2, name=f"/{tag}/If")
    for v, src in zip(node.outputs, then, strict=True):
        v.name = f"/{tag}/If/{src.name}"
        v.type = src.type
    b.nodes.append(node)
    return node.outputs[0], node.outputs[1]


def max_positions(config: Mapping[str, Any]) -> int:
    """Positions the rotary caches cover: the config's context length (at least 2048 when it
    does not say)."""
    return int(config.get("max_position_embeddings") or 2048)


__all__ = ["ACTIVATIONS", "EmitOptions", "emit_decoder", "max_positions", "unsupported"]
