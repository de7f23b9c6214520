"""Trace a few layers, repeat them: the ONNX graph of a deep model without tracing every layer.

``torch.onnx.export`` and onnxscript's optimizer take time that grows faster than the depth
(README, "Why the design is as it is"), while
the graph of layer 20 is layer 0's with other names, less what all layers share. An
architecture that says how its layers repeat (:class:`~loraformat.architecture.LayerRepeat`) is
exported like this:

1. **Choose the depth to trace.** The first layer of each kind is its *template*: it stands for
   every later layer of its kind. The traced depth ``k`` is one past the last template: 1 where
   all layers are alike, 2 for Gemma 2's alternation.
2. **Trace** the plugin's module built for ``k`` layers (the config's ``depth_key`` and the
   tensors cut to the first ``k`` layers), optimized as a full export is.
3. **Repeat**: the nodes of each layer are found by the module scope the exporter records on every
   node (``pkg.torch.onnx.name_scopes``). A template's nodes that depend, transitively, on nothing
   of the layer's own — its hidden state, its weights, its per-layer inputs (cache, LoRA slots) —
   compute what every layer of the kind computes alike (rotary tables, mask shapes): a full
   trace's common-subexpression elimination leaves them once, in the kind's first layer, so the
   copies read them there. The others are copied for layers ``k .. n-1``, with that layer's
   weights (checkpoint names), cache inputs and outputs (the full module's names), and the
   previous layer's hidden state as input. What the suffix (final norm, head) read from the last
   traced layer it reads from the last copy.

A layer's hidden state is the one value it reads from the layer before that the layer before
does not read itself; layer 0 has no layer before, and its hidden state is the one value from
before the layers that it reads, typed and shaped as the one value it passes on, and on which
that value depends (the embeddings; not a mask or a rotary table).

Every assumption is checked — one carried value per layer, nothing else read across layers, the
full module's input and output names reproduced, every node's inputs defined before it. Where a
check fails with the first layers (layer 0 reads two values that could be its hidden state),
the second layer of each kind is the template (``k`` = 2 where all layers are alike: the trace
itself has put the shared nodes in layer 0 then); where that fails too, ``None`` is returned and
the caller traces every layer, which is always right. The result equals the graph of a full
trace, node for node (``tests/test_export_repeat.py``).

One thing no 1-layer graph shows: a layer that reads its hidden state in a second role (an "x0"
skip connection that reads the embeddings again) gives layer 0 one value where the others read
two. Layer 0 then differs from the others, so by the contract (spec/PLUGINS.md §6.1) it is a
kind of its own, and layer 1 is the template of the rest. Where a plugin does not say so and
passes the tensor to layer 0 twice (``layer(h, x0=h)``), a hook on layer 0 sees it while the
layer is traced (the verdict is kept with the trace, in the graph cache too) and the second
layer is the template.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..architecture import LayerRepeat

#: Metadata key under which torch's exporter records a node's module scopes.
SCOPES = "pkg.torch.onnx.name_scopes"


class CannotRepeat(Exception):
    """The traced graph does not have the shape block repetition needs (internal; the exporter
    falls back to tracing every layer)."""


def plan_depth(
    kinds: Sequence[Hashable], occurrence: int = 1
) -> tuple[int, dict[Hashable, int]] | None:
    """``(k, template of each kind)``: trace ``k`` layers, repeat ``template[kind]`` (the kind's
    ``occurrence``-th layer: 1, its first, or 2, its second) for layers ``k ..``; ``None`` when a
    kind has fewer layers than that, or when tracing fewer layers than all would not be shorter."""
    count: dict[Hashable, int] = {}
    template: dict[Hashable, int] = {}
    for i, kind in enumerate(kinds):
        count[kind] = count.get(kind, 0) + 1
        if count[kind] == occurrence:
            template[kind] = i
    if set(template) != set(count):
        return None
    k = max(template.values()) + 1
    return (k, template) if k < len(kinds) else None


def layer_list_path(module: Any, depth: int) -> str | None:
    """The path of the module's one ``nn.ModuleList`` of ``depth`` entries (None if not one)."""
    from torch import nn

    found = [
        n for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth
    ]
    return found[0] if len(found) == 1 else None


def cut_to_depth(
    names: Sequence[str], path: str, depth: int
) -> list[str]:
    """``names`` without those of layers ``depth`` and beyond (``<path>.<i>.``)."""
    layer = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    return [n for n in names if not ((m := layer.match(n)) and int(m.group(1)) >= depth)]


def _index_tokens(name: str, index: int) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"(?<![0-9A-Za-z])\d+(?![0-9A-Za-z])", name)
            if int(m.group()) == index]


def reindex(name: str, old: int, new: int, known: set[str]) -> str | None:
    """``name`` with its one layer-index token ``old`` replaced by ``new``, if the result is one of
    ``known``; ``None`` when the name has no such token (a name all layers share)."""
    spans = _index_tokens(name, old)
    if not spans:
        return None
    if len(spans) > 1:
        raise CannotRepeat(f"{name!r} has the layer index {old} more than once")
    a, b = spans[0]
    renamed = f"{name[:a]}{new}{name[b:]}"
    if renamed not in known:
        raise CannotRepeat(f"{name!r} of layer {old} has no counterpart {renamed!r}")
    return renamed


@dataclass
class _Layers:
    prefix: list[Any]
    blocks: list[list[Any]]
    suffix: list[Any]
    owner: dict[int, int]  # id(node) → block index (-1 prefix, len(blocks) suffix)


def _partition(nodes: Sequence[Any], path: str, depth: int) -> _Layers:
    scope = re.compile(rf"'{re.escape(path)}\.(\d+)'")
    tagged: list[int | None] = []
    for node in nodes:
        m = scope.search(node.metadata_props.get(SCOPES, ""))
        tagged.append(int(m.group(1)) if m else None)
    known = [i for i, b in enumerate(tagged) if b is not None]
    if not known:
        raise CannotRepeat("no node carries a layer scope")
    first, last = known[0], known[-1]
    blocks: list[list[Any]] = [[] for _ in range(depth)]
    owner: dict[int, int] = {}
    current = 0
    for i, node in enumerate(nodes):
        if i < first:
            owner[id(node)] = -1
            continue
        if i > last:
            owner[id(node)] = depth
            continue
        b = tagged[i]
        if b is None:
            b = current  # an optimizer-made node among a layer's nodes belongs to it
        if b < current or b >= depth:
            raise CannotRepeat("layers' nodes are interleaved")
        current = b
        blocks[b].append(node)
        owner[id(node)] = b
    if any(not block for block in blocks):
        raise CannotRepeat("a layer has no nodes")
    prefix = [n for n in nodes if owner[id(n)] == -1]
    suffix = [n for n in nodes if owner[id(n)] == depth]
    return _Layers(prefix, blocks, suffix, owner)


def repeat_layers(
    model: Any,
    repeat: LayerRepeat,
    template: Mapping[Hashable, int],
    path: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    weights: Mapping[str, tuple[int, ...]],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> None:
    """Extend the onnx_ir ``model`` traced with ``k`` layers to ``len(repeat.kinds)`` layers, in
    place (module docstring). ``input_names``/``output_names`` are the full module's graph inputs
    and outputs, ``weights`` the checkpoint's tensor shapes by name, ``dynamic_axes`` the full
    module's (a copied input's axis names are the full module's: LoRA slot ``rank_<i>`` axes are
    numbered by slot, not by layer). Raises :class:`CannotRepeat`."""
    import onnx_ir as ir

    graph = model.graph
    depth = max(template.values()) + 1
    n_layers = len(repeat.kinds)
    nodes = list(graph)
    layers = _partition(nodes, path, depth)
    owner = layers.owner
    graph_outputs = {id(v) for v in graph.outputs}
    known_io = set(input_names) | set(output_names)
    layer_prefix = re.compile(rf"^{re.escape(path)}\.(\d+)\.")

    def producer_block(value: Any) -> int | None:
        node = value.producer()
        return None if node is None else owner[id(node)]

    def own(v: Any, j: int) -> bool:
        """Whether ``v`` is layer ``j``'s alone: one of its checkpoint tensors or a graph input
        with its index (its cache, its LoRA slot)."""
        if v.is_initializer():
            m = layer_prefix.match(v.name or "")
            return m is not None and int(m.group(1)) == j
        return v.is_graph_input() and bool(_index_tokens(v.name or "", j))

    def per_layer(j: int, seeds: Sequence[Any], owned: bool = True) -> set[int]:
        """The nodes of layer ``j`` that depend, transitively, on ``seeds`` or (``owned``) on
        what is layer ``j``'s alone. The others compute what every layer of the kind computes
        alike: a full trace's common-subexpression elimination leaves them once, in the kind's
        first layer, and the copies read them there."""
        reached = {id(v) for v in seeds}
        found: set[int] = set()
        for node in layers.blocks[j]:  # in graph order: producers come first
            if any(v is not None and (id(v) in reached or (owned and own(v, j)))
                   for v in node.inputs):
                found.add(id(node))
                reached.update(id(v) for v in node.outputs)
        return found

    def carried_in(j: int) -> Any:
        """The one value layer ``j`` reads from layer ``j - 1`` that layer ``j - 1`` does not
        read itself: its hidden state. What ``j - 1`` computed for itself and ``j`` reads too
        (a shared rotary table, a shape) was merged there by the exporter and is shared."""
        before = {id(v) for node in layers.blocks[j - 1] for v in node.inputs}
        read = {id(v): v for node in layers.blocks[j] for v in node.inputs
                if v is not None and producer_block(v) == j - 1 and id(v) not in before}
        if len(read) != 1:
            raise CannotRepeat(f"layer {j} reads {len(read)} values from layer {j - 1}")
        return next(iter(read.values()))

    def carried_out(j: int, mine: set[int]) -> Any:
        """The one value of layer ``j``'s own nodes (``mine``) read after it: by layer
        ``j + 1``, the suffix, or as a graph output shared by all layers (an encoder's last
        hidden state)."""
        out: dict[int, Any] = {}
        for node in layers.blocks[j]:
            for v in node.outputs:
                if id(node) in mine:
                    for user, _ in v.uses():
                        b = owner[id(user)]
                        if b not in (j, j + 1, depth):
                            raise CannotRepeat(f"layer {j}'s {v.name} is read by layer {b}")
                        if b != j:
                            out[id(v)] = v
                if id(v) in graph_outputs and _index_tokens(v.name or "", j) == []:
                    out[id(v)] = v
        if len(out) != 1:
            raise CannotRepeat(f"layer {j} passes on {len(out)} values")
        return next(iter(out.values()))

    def first_carried_in(out: Any) -> Any:
        """Layer 0's hidden state, which no earlier layer passes on: the one value from before
        the layers, read by layer 0, typed and shaped as the value it passes on, and on which
        that value depends."""
        found: dict[int, Any] = {}
        for node in layers.blocks[0]:
            for v in node.inputs:
                if (v is None or v.is_initializer() or v.type != out.type
                        or v.shape != out.shape
                        or (v.producer() is None and not v.is_graph_input())
                        or (v.producer() is not None and producer_block(v) != -1)
                        or id(v) in found):
                    continue
                if id(out.producer()) in per_layer(0, [v], owned=False):
                    found[id(v)] = v
        if len(found) != 1:
            raise CannotRepeat(f"layer 0 reads {len(found)} values like its hidden state")
        return next(iter(found.values()))

    carry_in: dict[int, Any] = {}
    mine: dict[int, set[int]] = {}  # template → its nodes that are copied per layer
    carry_out: dict[int, Any] = {}
    for j in sorted(set(template.values())):
        if j == 0:
            # What layer 0 passes on depends on its weights: find it by them, then what it read.
            passed = carried_out(0, per_layer(0, []))
            carry_in[0] = first_carried_in(passed)
        else:
            carry_in[j] = carried_in(j)
        mine[j] = per_layer(j, [carry_in[j]])
        carry_out[j] = carried_out(j, mine[j])
        if j == 0 and carry_out[0] is not passed:
            raise CannotRepeat(f"layer 0 passes on {passed.name} or {carry_out[0].name}")
        if id(carry_out[j].producer()) not in mine[j]:
            raise CannotRepeat(f"layer {j} passes on {carry_out[j].name}, which it shares")
    last_traced = carry_out[depth - 1]

    used = {v.name for node in nodes for v in node.outputs} | set(graph.initializers)
    used |= {v.name for v in graph.inputs}
    inputs_by_name = {v.name: v for v in graph.inputs}
    outputs_by_name = {v.name: v for v in graph.outputs}
    new_nodes: list[Any] = []
    carry = last_traced
    axes = dynamic_axes or {}

    def renamed(shape: Any, names: Mapping[str, str]) -> Any:
        if shape is None or not names:
            return shape
        return ir.Shape([ir.SymbolicDim(names.get(d.value, d.value))
                         if isinstance(d, ir.SymbolicDim) and d.value is not None else d
                         for d in shape])

    for i in range(depth, n_layers):
        t = template[repeat.kinds[i]]
        mapped: dict[int, Any] = {id(carry_in[t]): carry}
        dim_names: dict[str, str] = {}  # the template's axis names → this layer's

        def counterpart(
            v: Any, t: int = t, i: int = i, mapped: dict[int, Any] = mapped,
            dim_names: dict[str, str] = dim_names,
        ) -> Any:
            if v is None or id(v) in mapped:
                return None if v is None else mapped[id(v)]
            if v.is_initializer():
                m = layer_prefix.match(v.name)
                if m is None or int(m.group(1)) != t:
                    return v  # a constant all layers share
                name = f"{path}.{i}.{v.name[m.end():]}"
                if weights.get(name) != weights.get(v.name):
                    raise CannotRepeat(f"checkpoint tensor {name} is not shaped as {v.name}")
                new = graph.initializers.get(name)
                if new is None:
                    new = ir.Value(name=name, type=v.type, shape=v.shape, const_value=v.const_value)
                    graph.register_initializer(new)
                mapped[id(v)] = new
                return new
            if v.is_graph_input():
                name = reindex(v.name, t, i, known_io)
                if name is None:
                    return v  # input_ids, attention_mask, …
                new = inputs_by_name.get(name)
                if new is None:
                    dims = list(v.shape) if v.shape is not None else []
                    for axis, axis_name in axes.get(name, {}).items():
                        old = dims[int(axis)] if int(axis) < len(dims) else None
                        if isinstance(old, ir.SymbolicDim) and old.value != axis_name:
                            dim_names[str(old.value)] = axis_name
                    new = ir.Value(name=name, type=v.type, shape=renamed(v.shape, dim_names))
                    inputs_by_name[name] = new
                mapped[id(v)] = new
                return new
            b = producer_block(v)
            if b is not None and b >= 0 and (b > t or id(v.producer()) in mine.get(b, ())):
                raise CannotRepeat(f"layer {t} reads {v.name} of layer {b}")
            return v  # computed once, by an earlier node: shared by all layers of the kind

        for node in layers.blocks[t]:
            if id(node) not in mine[t]:
                continue  # shared: the copies read its outputs
            if any(isinstance(a.value, (ir.Graph, list)) and a.type in (
                ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                raise CannotRepeat(f"{node.op_type} has a subgraph")
            metadata = {
                k: v.replace(f"{path}.{t}", f"{path}.{i}") if k in (SCOPES, "namespace") else v
                for k, v in node.metadata_props.items()
            }
            copy = ir.Node(
                node.domain, node.op_type, [counterpart(v) for v in node.inputs],
                node.attributes.values(), overload=node.overload,
                num_outputs=len(node.outputs), version=node.version,
                name=f"{node.name}.layer{i}" if node.name else None,
                doc_string=node.doc_string, metadata_props=metadata,
            )
            for old, new in zip(node.outputs, copy.outputs, strict=True):
                new.type, new.shape = old.type, renamed(old.shape, dim_names)
                name = reindex(old.name, t, i, known_io) if id(old) in graph_outputs else None
                if name is None:
                    name = f"{old.name}.layer{i}"
                    if name in used:
                        raise CannotRepeat(f"value name {name} is taken")
                else:
                    outputs_by_name[name] = new
                used.add(name)
                new.name = name
                mapped[id(old)] = new
            new_nodes.append(copy)
        carry = mapped[id(carry_out[t])]

    # The suffix and the shared graph outputs now read the last copy's hidden state.
    for node in layers.suffix:
        for index, v in enumerate(node.inputs):
            if v is last_traced:
                node.replace_input_with(index, carry)
    if id(last_traced) in graph_outputs:
        name = last_traced.name
        last_traced.name = f"{name}.layer{depth - 1}"
        carry.name = name
        outputs_by_name[name] = carry
    if layers.suffix:
        graph.insert_before(layers.suffix[0], new_nodes)
    else:
        graph.extend(new_nodes)

    missing = [n for n in (*input_names, *output_names)
               if n not in inputs_by_name and n not in outputs_by_name]
    if missing:
        raise CannotRepeat(f"graph lacks {missing[:3]}")
    graph.inputs.clear()
    graph.inputs.extend(inputs_by_name[n] for n in input_names)
    graph.outputs.clear()
    graph.outputs.extend(outputs_by_name[n] for n in output_names)
    _check_order(graph)


def _check_order(graph: Any) -> None:
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for v in node.inputs:
            if v is not None and id(v) not in defined:
                raise CannotRepeat(f"{node.name} reads {v.name} before it is computed")
        defined.update(id(v) for v in node.outputs)
    for v in graph.outputs:
        if id(v) not in defined:
            raise CannotRepeat(f"graph output {v.name} is not computed")


#: Model metadata a first-layer trace carries (into the graph cache too): whether layer 0 was
#: given one tensor in two arguments ("1"/"0").
LAYER0_ALIASED = "loraformat.layer0_aliased"


@contextlib.contextmanager
def _watch_first_layer(module: Any, path: str) -> Iterator[dict[str, bool]]:
    """While active, record whether layer 0 of ``module``'s layer list is called with one tensor
    in two arguments (``seen["aliased"]``). That is the one thing a graph of layer 0 alone
    cannot show: a layer that reads its hidden state in a second role (an "x0" skip connection
    reading the embeddings) is given the same tensor twice there, a different one everywhere
    else."""
    import torch

    seen: dict[str, bool] = {}

    def hook(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        flat: list[Any] = []
        for value in (*args, *kwargs.values()):
            flat.extend(value if isinstance(value, (tuple, list)) else [value])
        ids = [id(v) for v in flat if isinstance(v, torch.Tensor)]
        seen["aliased"] = seen.get("aliased", False) or len(ids) != len(set(ids))

    handle = module.get_submodule(path)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def repeated_graph(
    full: Any,
    repeat: LayerRepeat,
    weights: Mapping[str, tuple[int, ...]],
    build_at: Callable[[int, str], Any],
    trace: Callable[[Any, set[str], Callable[[Any], None]], Any],
) -> tuple[Any, str] | tuple[None, str]:
    """The graph of ``full`` (an :class:`~loraformat.architecture.ExportModel`) by tracing a few
    layers and repeating them, and a line saying what was done; ``(None, why)`` where it cannot
    (the caller traces every layer).

    ``build_at(k, path)`` builds the export model cut to ``k`` layers (tensors under
    ``<path>.<i>.`` for ``i >= k`` left out); ``trace(export model, weight names, annotate)`` is
    the exporter's trace-and-optimize, which calls ``annotate(graph)`` on a graph it traces
    (before caching it; not on one from the cache); ``weights`` the checkpoint's tensor shapes by
    name. The first-layer plan is refused where layer 0 was given one tensor in two arguments
    (:func:`_watch_first_layer`), or where that is not known.
    """
    n = len(repeat.kinds)
    path = layer_list_path(full.module, n)
    plans = [p for p in (plan_depth(repeat.kinds, 1), plan_depth(repeat.kinds, 2)) if p]
    if not plans:
        return None, "every layer traced: the last layer is the first of its kind"
    if path is None:
        return None, "every layer traced: the module has no single list of its layers"
    why: list[str] = []
    for depth, template in plans:
        small = build_at(depth, path)
        kept = set(cut_to_depth(list(weights), path, depth))
        with _watch_first_layer(small.module, path) as seen:
            model = trace(small, kept, lambda graph, seen=seen: graph.metadata_props.update(
                {LAYER0_ALIASED: "1" if seen.get("aliased", True) else "0"}
            ))
        aliased = model.metadata_props.pop(LAYER0_ALIASED, "1") != "0"
        try:
            copied = template.get(repeat.kinds[0]) == 0 and repeat.kinds[0] in repeat.kinds[depth:]
            if aliased and copied:  # layer 0 stands for later layers
                raise CannotRepeat("layer 0 is given one tensor in two arguments")
            repeat_layers(
                model, repeat, template, path, full.input_names, full.output_names, weights,
                full.dynamic_axes,
            )
        except CannotRepeat as error:
            why.append(f"{depth} traced, {error}")
            continue
        failed = f" (not {why[0]})" if why else ""
        return model, f"{depth} of {n} layers traced, the rest repeated{failed}"
    return None, f"every layer traced: {'; '.join(why)}"


__all__ = [
    "LAYER0_ALIASED",
    "SCOPES",
    "CannotRepeat",
    "cut_to_depth",
    "layer_list_path",
    "plan_depth",
    "reindex",
    "repeat_layers",
    "repeated_graph",
]
