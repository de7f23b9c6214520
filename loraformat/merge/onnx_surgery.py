"""Merging adapters into an existing ONNX model's initializers, without torch.

``loraformat merge base.onnx ADAPTER -o merged.onnx`` changes initializer values only: the merged
graph has exactly the base graph's nodes, so inference costs what the base costs.

**Finding a layer's weight.** For an adapter layer ``P``, the candidates are ``P`` and the name the
architecture's name table gives the layer in memory (``names.foreign(P, "peft")``: transformers 5
renames some modules on load, and ``torch.onnx.export`` of a transformers model uses in-memory
names). For each candidate, in order: the initializer named ``<candidate>.weight`` (graphs from
``loraformat export``/``merge -o x.onnx``, which keep checkpoint names, GPT-2's Conv1D weights in
any export); else the one initializer whose ``pkg.onnxscript.optimizer.folded_from`` metadata is
exactly ``[<candidate>.weight]`` (the exporter's default optimizer folds ``Transpose(W)`` of an
nn.Linear weight into ``val_N``). A weight present both by name and as a folded copy (a tied
embedding/LM head) is refused: merging one copy would leave the other stale.

**Orientation.** The layout is read from how the graph uses the weight, through any
Transpose/Cast/Identity: input B of ``MatMul`` is [in, out]; input B of ``Gemm`` is [out, in] when
``transB=1`` and [in, out] otherwise; the data input of ``Gather`` is an embedding table
[in, out] = [vocab, dim]. Without such a use the stored shape decides; a *square* weight with no
telling use is taken as [out, in] (nn.Linear) when found by name — [in, out] for an embedding —
and as [in, out] when found through ``folded_from`` (the fold is a transpose of an nn.Linear
weight).

**Sharing.** An initializer used by more than one MatMul/Gemm/Gather/Conv (after following
Transpose/Cast) is shared, e.g. after the exporter deduplicated identical tensors. One exception:
an embedding table read by one Gather and by the MatMul/Gemm of a tied LM head is one checkpoint
tensor used twice by design, and is merged (changing both uses, as transformers' tying does).
Merging into any other shared initializer would change every user, so it is refused, unless
``unshare``: the users that belong to the layer
(by the exporter's ``pkg.torch.onnx.name_scopes`` node metadata, or — for a bias — the Add fed by
the layer's MatMul) get a copy of their own, named ``<P>.weight``/``<P>.bias`` where that name is
free.

**Bias** (``lora_bias``): Gemm's C input, or the initializer added to the layer's MatMul output;
else the initializer named ``<candidate>.bias``.

**What cannot be checked.** An ONNX file carries no checkpoint fingerprint, so an adapter's
``base_model.fingerprint`` is not compared (``force`` is implied); the architecture is compared
when the plugin recognizes the graph's (or its ``folded_from``) tensor names. Models with external
data are read lazily and written with external data again (``<out>.data``).
"""

from __future__ import annotations

import ast
import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import architecture as arch
from ..architecture import DenseLayer
from ..atomic import check_output
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ..onnx_io import EXTERNAL_DATA_THRESHOLD, save_model
from ..quant.survival import DEFAULT_THRESHOLD, SurvivalReport
from . import onnx_int4
from .plan import MERGED_KEY, MergePlan, open_adapters, plan_merge, read_merged

FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_PASS_THROUGH = {"Transpose", "Cast", "Identity"}
_COMPUTE = {"MatMul", "Gemm", "Gather", "Conv"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SurgeryResult:
    """What a surgery wrote."""

    path: Path
    external_data: Path | None
    tensors_changed: int
    layers: int
    unshared: list[str] = field(default_factory=list)
    survival: SurvivalReport | None = None  # when MatMulNBits weights were requantized

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "output": str(self.path),
            "external_data": str(self.external_data) if self.external_data else None,
            "tensors_changed": self.tensors_changed,
            "layers": self.layers,
            "unshared": self.unshared,
        }
        if self.survival is not None:
            data["survival"] = self.survival.to_json()
        return data


@dataclass
class _Found:
    value: Any  # onnx_ir.Value (an initializer)
    transposed: bool = False  # replacements: stored as the transpose of the checkpoint tensor
    quantized: onnx_int4.QuantizedLayer | None = None  # a MatMulNBits weight (value is its B)


# -- graph queries -------------------------------------------------------------------------------


def _folded_from(value: Any) -> list[str]:
    text = value.metadata_props.get(FOLDED_FROM)
    if not text:
        return []
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return [text]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)]


def _terminal_uses(value: Any) -> list[tuple[Any, int, bool]]:
    """(node, input index, transposed on the way) for each use past Transpose/Cast/Identity."""
    out: list[tuple[Any, int, bool]] = []
    stack = [(value, False)]
    seen = set()
    while stack:
        current, flipped = stack.pop()
        for use in current.uses():
            node, idx = use.node, use.idx
            if node.op_type in _PASS_THROUGH and id(node) not in seen:
                seen.add(id(node))
                flip = flipped
                if node.op_type == "Transpose":
                    perm = node.attributes.get("perm")
                    perm = list(perm.value) if perm is not None else None
                    if perm not in (None, [1, 0]):
                        out.append((node, idx, flipped))
                        continue
                    flip = not flipped
                stack.append((node.outputs[0], flip))
            else:
                out.append((node, idx, flipped))
    return out


def _use_layout(node: Any, idx: int, flipped: bool) -> str | None:
    """The stored layout a use implies, or None when the use says nothing."""
    layout = None
    if node.op_type == "MatMul" and idx == 1:
        layout = "in_out"
    elif node.op_type == "Gemm" and idx == 1:
        trans_b = node.attributes.get("transB")
        layout = "out_in" if trans_b is not None and trans_b.value else "in_out"
    elif node.op_type == "Gather" and idx == 0:
        layout = "in_out"
    if layout is None or not flipped:
        return layout
    return "out_in" if layout == "in_out" else "in_out"


def _scopes(node: Any) -> list[str]:
    text = node.metadata_props.get(NAME_SCOPES)
    if not text:
        return []
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in scopes] if isinstance(scopes, (list, tuple)) else []


class _Index:
    """Initializers by name and by the single name they were folded from."""

    def __init__(self, model: Any) -> None:
        self.graph = model.graph
        self.by_name: dict[str, Any] = dict(self.graph.initializers)
        self.folded: dict[str, list[Any]] = {}
        for value in self.by_name.values():
            sources = _folded_from(value)
            if len(sources) == 1:
                self.folded.setdefault(sources[0], []).append(value)

        self.quantized = onnx_int4.has_quantized(model)

    def names(self) -> list[str]:
        return list(self.by_name) + list(self.folded) + onnx_int4.quantized_names(self.by_name)

    def find(self, tensor: str, where: object) -> tuple[Any, str] | None:
        """(initializer, "name" | "folded") holding checkpoint tensor ``tensor``, or None."""
        named = self.by_name.get(tensor)
        folded = self.folded.get(tensor, [])
        if named is not None and folded:
            raise LoraformatError(
                where, f"{tensor!r} is in the graph twice (as itself and folded into "
                f"{folded[0].name!r}, e.g. a tied embedding and LM head); merging one copy would "
                "leave the other stale",
            )
        if named is not None:
            return named, "name"
        if len(folded) > 1:
            raise LoraformatError(
                where, f"{tensor!r} was folded into {len(folded)} initializers "
                f"({', '.join(v.name for v in folded[:3])}); cannot tell which to merge into",
            )
        if folded:
            return folded[0], "folded"
        return None

    def free_name(self, wanted: str) -> str:
        name, n = wanted, 1
        while name in self.by_name or any(v.name == name for v in self.graph.inputs):
            name = f"{wanted}.unshared{n}"
            n += 1
        return name

    def add_copy(self, value: Any, name: str) -> Any:
        import onnx_ir as ir

        array = np.array(value.const_value.numpy(), copy=True)
        new = ir.Value(name=name, type=value.type, shape=value.shape)
        new.const_value = ir.Tensor(array, name=name)
        self.graph.register_initializer(new)
        self.by_name[name] = new
        return new


# -- locating what an adapter changes --------------------------------------------------------------


@dataclass
class _Layout:
    layers: dict[str, DenseLayer]
    shapes: dict[str, tuple[int, ...]]
    found: dict[str, _Found]  # checkpoint-style tensor name → initializer
    unshared: list[str]


def _candidates(path: str, architecture: str | None) -> list[str]:
    names = [path]
    if architecture:
        with contextlib.suppress(Exception):
            other = arch.get_architecture(architecture).names.foreign(path, "peft")
            if other and other not in names:
                names.append(other)
    return names


def _belongs(node: Any, candidates: Sequence[str]) -> bool:
    scopes = _scopes(node)
    return any(c in scopes for c in candidates)


def _unshare(
    index: _Index, value: Any, mine: Callable[[Any, int], bool], name: str, where: object
) -> Any:
    """Give the direct uses of ``value`` for which ``mine`` holds their own copy named ``name``."""
    direct = list(value.uses())
    ours = []
    for use in direct:
        terminals = _terminal_uses_from(use)
        flags = {mine(node, idx) for node, idx, _ in terminals}
        if flags == {True}:
            ours.append(use)
        elif flags == {True, False}:
            raise LoraformatError(
                where, f"cannot unshare {value.name!r}: node {use.node.name!r} serves this layer "
                "and others",
            )
    if not ours or len(ours) == len(direct):
        raise LoraformatError(
            where, f"cannot unshare {value.name!r}: the graph does not say which of its "
            f"{len(direct)} users belong to this layer (no name-scope metadata)",
        )
    new = index.add_copy(value, index.free_name(name))
    for use in ours:
        use.node.replace_input_with(use.idx, new)
    return new


def _terminal_uses_from(use: Any) -> list[tuple[Any, int, bool]]:
    node = use.node
    if node.op_type in _PASS_THROUGH:
        flipped = node.op_type == "Transpose"
        return [(n, i, f != flipped) for n, i, f in _terminal_uses(node.outputs[0])] or [
            (node, use.idx, False)
        ]
    return [(node, use.idx, False)]


def locate(
    model: Any,
    adapters: Sequence[Adapter],
    *,
    architecture: str | None,
    where: object,
    unshare: bool = False,
) -> _Layout:
    """Find, for every adapter layer and replacement, the initializer to change and its layout."""
    index = _Index(model)
    layers: dict[str, DenseLayer] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    found: dict[str, _Found] = {}
    owner: dict[int, str] = {}
    unshared: list[str] = []
    for adapter in adapters:
        for path, spec in adapter.specs.items():
            if path in layers:
                layers[path] = _check_again(layers[path], spec, adapter)
                continue
            candidates = _candidates(path, architecture or adapter.architecture)
            hit = None
            for candidate in candidates:
                hit = index.find(candidate + ".weight", adapter.path)
                if hit is not None:
                    break
            if hit is None:
                quantized = _quantized(index, path, spec, candidates, adapter.path, where)
                owner_path = owner.setdefault(id(quantized.packed), path)
                if owner_path != path:
                    raise LoraformatError(
                        adapter.path, f"layers {owner_path!r} and {path!r} share the initializer "
                        f"{quantized.packed.name!r}; merging into one would change both",
                    )
                dense = DenseLayer(path, quantized.k, quantized.n, layout="out_in", kind="linear")
                layers[path] = dense
                found[dense.weight] = _Found(quantized.packed, quantized=quantized)
                shapes[dense.weight] = (quantized.n, quantized.k)
                continue
            value, how = hit
            uses = _terminal_uses(value)
            compute = [(n, i, f) for n, i, f in uses if n.op_type in _COMPUTE]
            tied = _tied_embedding(compute) if spec.kind == "embedding" else None
            if tied is not None:
                compute = tied  # one table, also read by the tied LM head: merge it (as HF does)
            if len(compute) > 1:
                if not unshare:
                    raise LoraformatError(
                        adapter.path, f"layer {path!r}: its weight {value.name!r} is shared by "
                        f"{len(compute)} nodes ({', '.join(n.name for n, _, _ in compute[:3])}); "
                        "merging would change them all (use [[unshare]] to give this layer its "
                        "own copy)",
                    )
                value = _unshare(
                    index, value, lambda n, i, c=candidates: _belongs(n, c), path + ".weight",
                    adapter.path,
                )
                unshared.append(value.name)
                uses = _terminal_uses(value)
                compute = [(n, i, f) for n, i, f in uses if n.op_type in _COMPUTE]
            if id(value) in owner and owner[id(value)] != path:
                raise LoraformatError(
                    adapter.path, f"layers {owner[id(value)]!r} and {path!r} share the initializer "
                    f"{value.name!r}; merging into one would change both",
                )
            owner[id(value)] = path
            stored = tuple(int(d) for d in value.shape)
            layout = _layout_of(value, compute, how, spec, stored, path, adapter.path)
            kind = spec.kind
            bias_name = None
            if spec.lora_bias:
                bias = _find_bias(index, value, compute, candidates, spec.out_features)
                if bias is not None:
                    bias_value = bias
                    if len(list(bias_value.uses())) > 1:
                        if not unshare:
                            raise LoraformatError(
                                adapter.path, f"layer {path!r}: its bias {bias_value.name!r} is "
                                f"shared by {len(list(bias_value.uses()))} nodes; merging would "
                                "change them all (use [[unshare]] to give this layer its own copy)",
                            )
                        users = {id(n) for n, _, _ in compute}
                        bias_value = _unshare_bias(index, bias_value, compute, users, path)
                        unshared.append(bias_value.name)
                    bias_name = path + ".bias"
                    found[bias_name] = _Found(bias_value)
                    shapes[bias_name] = tuple(int(d) for d in bias_value.shape)
            dense = DenseLayer(
                path, spec.in_features, spec.out_features, layout=layout, kind=kind,
                bias=bias_name,
            )
            layers[path] = dense
            found[dense.weight] = _Found(value)
            shapes[dense.weight] = stored
        for name in adapter.replacement_names:
            if name in found:
                continue
            target = adapter.replacement(name)
            hit = index.find(name, adapter.path)
            if hit is None and name.endswith(".bias") and len(target.shape) == 1:
                hit = _bias_of_weight(index, name, int(target.shape[0]), unshare, unshared, adapter)
            if hit is None:
                raise LoraformatError(
                    adapter.path,
                    f"adapter replaces {name!r}, which the graph {where} does not have (an "
                    "exporter may drop or merge all-zero tensors; `loraformat export` keeps "
                    "every checkpoint tensor)",
                )
            value, _how = hit
            stored = tuple(int(d) for d in value.shape)
            transposed = False
            if stored != tuple(target.shape):
                if len(stored) == 2 and stored == tuple(target.shape)[::-1]:
                    transposed = True
                else:
                    raise LoraformatError(
                        adapter.path, f"shape mismatch: replacement {name!r} is "
                        f"{list(target.shape)}, the graph's {value.name!r} is {list(stored)}",
                    )
            elif _how == "folded" and len(stored) == 2 and stored[0] == stored[1]:
                transposed = True  # a folded weight is the transpose of the checkpoint tensor
            if len(list(value.uses())) > 1:
                raise LoraformatError(
                    adapter.path, f"replacement {name!r}: initializer {value.name!r} is shared by "
                    f"{len(list(value.uses()))} nodes; replacing it would change them all",
                )
            found[name] = _Found(value, transposed)
            shapes[name] = tuple(target.shape)
    return _Layout(layers, shapes, found, unshared)


def _quantized(
    index: _Index, path: str, spec: Any, candidates: Sequence[str], adapter_path: object,
    where: object,
) -> onnx_int4.QuantizedLayer:
    """The MatMulNBits weight of layer ``path`` (no float initializer holds it), or the refusal."""
    for candidate in candidates:
        quantized = onnx_int4.find(index.by_name, candidate + ".weight", where)
        if quantized is None:
            continue
        if spec.kind != "linear" or spec.lora_bias:
            raise LoraformatError(
                where, f"layer {path!r} is a MatMulNBits weight; only a linear layer's low-rank "
                "update (no lora_bias) can be merged into it",
            )
        if (spec.in_features, spec.out_features) != (quantized.k, quantized.n):
            raise LoraformatError(
                where, f"shape mismatch at layer {path!r}: adapter is {spec.in_features}→"
                f"{spec.out_features} (in→out), the graph's MatMulNBits node "
                f"{quantized.node.name!r} is K={quantized.k}→N={quantized.n}",
            )
        return quantized
    if index.quantized:  # the graph's naming is the problem: name the graph
        raise LoraformatError(
            where, f"adapter layer {path!r} is not in the graph: "
            f"{onnx_int4.unnamed_message(list(candidates))}",
        )
    raise LoraformatError(
        adapter_path, f"adapter layer {path!r} is not in the graph {where}: no initializer named "
        f"{candidates[-1] + '.weight'!r} or folded from it",
    )


def _bias_of_weight(
    index: _Index, name: str, size: int, unshare: bool, unshared: list[str], adapter: Adapter
) -> tuple[Any, str] | None:
    """The bias initializer of the layer whose weight is ``<name minus .bias>.weight``, found
    through the graph (the exporter may have merged identical biases into one initializer)."""
    path = name[: -len(".bias")]
    hit = index.find(path + ".weight", adapter.path)
    if hit is None:
        return None
    compute = [(n, i, f) for n, i, f in _terminal_uses(hit[0]) if n.op_type in _COMPUTE]
    bias = _find_bias(index, hit[0], compute, [path], size)
    if bias is None:
        return None
    if len(list(bias.uses())) > 1:
        if not unshare:
            raise LoraformatError(
                adapter.path, f"replacement {name!r}: its initializer {bias.name!r} is shared by "
                f"{len(list(bias.uses()))} nodes; replacing it would change them all (use "
                "[[unshare]] to give this layer its own copy)",
            )
        bias = _unshare_bias(index, bias, compute, set(), path)
        unshared.append(bias.name)
    return bias, "name"


def _tied_embedding(compute: list) -> list | None:
    """The Gather use, when the weight is an embedding table whose other users are the MatMul/Gemm
    of a tied LM head (one checkpoint tensor, two uses by design: merging changes both, exactly
    as transformers' tied weights do)."""
    gathers = [u for u in compute if u[0].op_type == "Gather" and u[1] == 0]
    rest = [u for u in compute if u not in gathers]
    if len(gathers) == 1 and rest and all(n.op_type in ("MatMul", "Gemm") for n, _, _ in rest):
        return gathers
    return None


def _check_again(dense: DenseLayer, spec: Any, adapter: Adapter) -> DenseLayer:
    if spec.lora_bias and dense.bias is None:
        raise LoraformatError(
            adapter.path, f"layer {dense.path!r} has a lora_bias, but the graph has no bias for it"
        )
    return dense


def _layout_of(
    value: Any, compute: list, how: str, spec: Any, stored: tuple[int, ...], path: str,
    where: object,
) -> str:
    expected = {
        "out_in": (spec.out_features, spec.in_features),
        "in_out": (spec.in_features, spec.out_features),
    }
    told = {_use_layout(n, i, f) for n, i, f in compute} - {None}
    if len(told) > 1:
        raise LoraformatError(
            where, f"layer {path!r}: the graph uses {value.name!r} in both orientations"
        )
    if told:
        layout = told.pop()
    else:
        fits = [name for name, shape in expected.items() if shape == stored]
        if len(fits) == 1:
            layout = fits[0]
        else:
            by_name = "in_out" if spec.kind == "embedding" else "out_in"
            layout = by_name if how == "name" else ("out_in" if by_name == "in_out" else "in_out")
    if expected[layout] != stored:
        raise LoraformatError(
            where, f"shape mismatch at layer {path!r}: adapter is {spec.in_features}→"
            f"{spec.out_features} (in→out), the graph's {value.name!r} is {list(stored)} "
            f"({layout})",
        )
    return layout


def _find_bias(
    index: _Index, weight: Any, compute: list, candidates: Sequence[str], out_features: int
) -> Any | None:
    for node, _idx, _ in compute:
        if (
            node.op_type == "Gemm"
            and len(node.inputs) > 2
            and node.inputs[2] is not None
            and node.inputs[2].const_value is not None
        ):
            return node.inputs[2]
        if node.op_type == "MatMul":
            for use in node.outputs[0].uses():
                if use.node.op_type != "Add":
                    continue
                other = use.node.inputs[1 - use.idx]
                if (
                    other is not None
                    and other.is_initializer()
                    and tuple(int(d) for d in other.shape) == (out_features,)
                ):
                    return other
    for candidate in candidates:
        value = index.by_name.get(candidate + ".bias")
        if value is not None:
            return value
    return None


def _unshare_bias(index: _Index, bias: Any, compute: list, users: set[int], path: str) -> Any:
    new = index.add_copy(bias, index.free_name(path + ".bias"))
    for node, _, _ in compute:
        if node.op_type == "Gemm" and node.inputs[2] is bias:
            node.replace_input_with(2, new)
        elif node.op_type == "MatMul":
            for use in node.outputs[0].uses():
                if use.node.op_type == "Add" and use.node.inputs[1 - use.idx] is bias:
                    use.node.replace_input_with(1 - use.idx, new)
    return new


# -- the entry point ----------------------------------------------------------------------------


def merge_onnx(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    subtract: bool = False,
    force: bool = True,
    allow_nonfinite: bool = False,
    unshare: bool = False,
    threshold: float | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SurgeryResult:
    """Merge (or with ``subtract``, unmerge) ``adapters`` into the initializers of the ONNX model
    ``base`` and write ``out`` atomically; the graph's nodes are unchanged (except the rewired
    inputs of layers ``unshare`` gives their own copy). See the module docstring for how layers
    are found and oriented, and :func:`~loraformat.merge.plan.plan_merge` for the refusals.
    An ONNX file has no fingerprint to compare; ``force`` merges an adapter the model records as
    merged already (``metadata_props``).
    Weights stored in MatMulNBits nodes are requantized (:mod:`~loraformat.merge.onnx_int4`) and
    the result carries the survival report; ``threshold`` is its warning's share.
    """
    import onnx_ir as ir

    source = Path(base)
    if not source.is_file():
        raise LoraformatError(source, "ONNX model not found")
    target = check_output(out, overwrite)
    if target.suffix != ".onnx":
        raise LoraformatError(target, "the output of ONNX surgery must end in .onnx")
    if target.resolve() == source.resolve():
        raise LoraformatError(target, "output is the base itself; inputs are never modified")
    try:
        model = ir.load(source)
    except Exception as exc:  # onnx/protobuf raise many types for a broken file
        raise LoraformatError(source, f"cannot read the ONNX model ({type(exc).__name__}: {exc})") \
            from None
    with contextlib.ExitStack() as stack:
        opened = open_adapters(stack, adapters)
        index_names = _Index(model).names()
        detected = None
        with contextlib.suppress(Exception):
            found = arch.detect(arch.CheckpointInfo(shapes=dict.fromkeys(index_names, ())))
            detected = found.id if found is not None else None
        for adapter in opened:  # before locating, so the message names the real problem
            if detected is not None and adapter.architecture != detected:
                raise LoraformatError(
                    adapter.path, f"adapter is for architecture {adapter.architecture!r}, but the "
                    f"graph {source} is {detected!r}",
                )
        layout = locate(model, opened, architecture=detected, where=source, unshare=unshare)
        if subtract and any(hit.quantized is not None for hit in layout.found.values()):
            raise LoraformatError(
                source, "unmerge from MatMulNBits (int4/int8) weights is not supported: the merge "
                "requantized them, so subtracting the adapter does not give the base back",
            )
        plan: MergePlan = plan_merge(
            layout.layers, layout.shapes, opened, architecture=detected, base_path=source,
            weights=weights, subtract=subtract, fingerprint=None, force=force,
            allow_nonfinite=allow_nonfinite,
            merged=read_merged(model.metadata_props.get(MERGED_KEY), source),
        )
        model.metadata_props[MERGED_KEY] = plan.merged_record
        total = len(plan.ops)
        external = False
        size = 0
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is not None:
                size += int(tensor.nbytes)
                external = external or isinstance(tensor, ir.ExternalTensor)
        report = SurvivalReport(
            threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
            advice=onnx_int4.ADVICE,
        )
        for done, (name, op) in enumerate(plan.ops.items(), start=1):
            hit = layout.found[name]
            if hit.quantized is not None:  # dequantize, merge, requantize, measure
                report.add(onnx_int4.merge_layer(hit.quantized, op, name))
                if progress is not None:
                    progress(done, total)
                continue
            tensor = hit.value.const_value
            array = np.asarray(tensor.numpy())
            current = array.T if hit.transposed else array
            new = op.apply(np.array(current, copy=True))
            if hit.transposed:
                new = new.T
            hit.value.const_value = ir.Tensor(np.ascontiguousarray(new), name=hit.value.name)
            if progress is not None:
                progress(done, total)
        data = save_model(model, target, external or size > EXTERNAL_DATA_THRESHOLD)
    return SurgeryResult(target, data, len(plan.ops), plan.layer_count, layout.unshared,
                         report if report.layers else None)


__all__ = ["FOLDED_FROM", "NAME_SCOPES", "SurgeryResult", "locate", "merge_onnx"]
