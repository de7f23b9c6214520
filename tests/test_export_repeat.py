"""Trace a few layers and repeat them (loraformat/export/repeat.py): the same graph as tracing
every layer, for every built-in architecture and layer pattern, checked node by node against a
full trace and run in ONNX Runtime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_families
import tiny_models

from loraformat.architecture import ExportOptions
from loraformat.export.onnx import export_onnx
from loraformat.export.repeat import CannotRepeat, plan_depth, reindex

pytestmark = pytest.mark.slow


def canonical(path: Path) -> dict:
    """The graph with its generated names replaced by the order they are first defined in:
    graph inputs, outputs and checkpoint initializers keep their names, constants are named by
    dtype, shape and content. Two exports of one model are the same graph iff these are equal."""
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {
        t.name: (t.data_type, tuple(t.dims),
                 hashlib.sha1(onnx.numpy_helper.to_array(t).tobytes()).hexdigest())
        for t in graph.initializer if t.name.startswith("val_")
    }
    named = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    ids: dict[str, str] = {}

    def key(name: str) -> object:
        if name in constants:
            return constants[name]
        if name == "" or name in named:
            return name
        return ids.setdefault(name, f"#{len(ids)}")

    types = {v.name: str(v.type) for v in graph.input}

    def read(node: onnx.NodeProto, name: str) -> object:
        # Which of several inputs of one symbolic shape the exporter reads a size from is
        # arbitrary (Gemma 2: past_key_values.1 in one trace, .5 in the other): a size is a size.
        if node.op_type == "Shape" and name in types:
            return ("shape of an input typed", types[name])
        return key(name)

    nodes = [
        (n.domain, n.op_type, tuple(read(n, i) for i in n.input),
         tuple(key(o) for o in n.output),
         tuple(sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
        for n in graph.node
    ]
    return {
        "inputs": [(v.name, str(v.type)) for v in graph.input],
        "outputs": [(v.name, str(v.type), key(v.name)) for v in graph.output],
        "weights": sorted((t.name, t.data_type, tuple(t.dims)) for t in graph.initializer
                          if t.name not in constants),
        "constants": sorted(constants.values()),
        "nodes": nodes,
    }


def _feed(session: ort.InferenceSession, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        sizes = {"batch": 2, "sequence": 5, "past_sequence": 3, "total_sequence": 8}
        dims = [d if isinstance(d, int) else sizes.get(d, 2) for d in i.shape]
        if i.name == "pixel_values" or "past" in i.name:
            feed[i.name] = rng.standard_normal(dims).astype(np.float32)
        elif i.name == "input_ids":
            feed[i.name] = rng.integers(0, vocab, dims).astype(np.int64)
        elif "mask" in i.name:
            feed[i.name] = np.ones(dims, dtype=np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.broadcast_to(np.arange(dims[1]) + 3, dims).astype(np.int64).copy()
        else:
            feed[i.name] = np.zeros(dims, dtype=np.int64)
    return feed


def _run(path: Path, vocab: int) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, _feed(session, vocab))


CASES = {
    # name: (builder, with_past, the line saying how many layers were traced)
    "llama": (lambda out: tiny_models.llama(out, layers=4), True, "1 of 4"),
    "gpt2": (lambda out: tiny_models.gpt2(out, layers=4), True, "1 of 4"),
    "bert": (lambda out: tiny_models.bert(out, layers=4), False, "1 of 4"),
    "vit": (lambda out: tiny_models.vit(out, layers=3), False, "1 of 3"),
    "qwen2": (lambda out: tiny_families.qwen2(out, layers=3), True, "1 of 3"),  # tied, biases
    "qwen3": (lambda out: tiny_families.qwen3(out, layers=3), True, "1 of 3"),
    "mistral": (lambda out: tiny_families.mistral(out, layers=3), True, "1 of 3"),
    "phi3": (lambda out: tiny_families.phi3(out, layers=4), True, "1 of 4"),
    # sliding and global layers alternating, each with its own rope (Gemma 3) or window: the
    # first layer of each kind is traced
    "gemma2": (lambda out: tiny_families.gemma2(out, layers=6), True, "2 of 6"),
    "gemma3": (lambda out: tiny_families.gemma3(out, layers=5), False, "2 of 5"),
    # Qwen2 with max_window_layers=1: one full-attention layer, then sliding ones
    "qwen2-window": (lambda out: tiny_families.qwen2(out, layers=5, sliding_window=4), True,
                     "2 of 5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_repeated_layers_give_the_graph_of_a_full_trace(case, tmp_path):
    build, with_past, traced = CASES[case]
    base = build(tmp_path / "base")
    options = ExportOptions(with_past=with_past)
    fast = export_onnx(base, tmp_path / "repeated.onnx", options=options)
    full = export_onnx(base, tmp_path / "full.onnx", options=options, repeat_layers=False)
    # the first layer of each kind was the template: no fallback to its second
    assert fast.traced == f"{traced} layers traced, the rest repeated", fast.traced
    assert full.traced == "every layer traced"
    got, want = canonical(fast.path), canonical(full.path)
    assert got["inputs"] == want["inputs"] and got["outputs"] == want["outputs"]
    assert got["weights"] == want["weights"] and got["constants"] == want["constants"]
    assert len(got["nodes"]) == len(want["nodes"])
    assert got["nodes"] == want["nodes"]
    vocab = 96
    for a, b in zip(_run(fast.path, vocab), _run(full.path, vocab), strict=True):
        assert np.array_equal(a, b)


def test_lora_slot_graphs_repeat_too(tmp_path):
    from loraformat.export.slots import export_with_slots

    base = tiny_models.llama(tmp_path / "base", layers=4)
    fast = export_with_slots(base, tmp_path / "repeated.onnx", with_past=True,
                             targets=["q_proj", "down_proj"])
    full = export_with_slots(base, tmp_path / "full.onnx", with_past=True,
                             targets=["q_proj", "down_proj"], repeat_layers=False)
    assert fast.traced == "1 of 4 layers traced, the rest repeated", fast.traced
    assert full.traced == "every layer traced"
    got, want = canonical(fast.path), canonical(full.path)
    assert got == want  # slot inputs with their own rank_<i> axes, per layer
    # an adapter in the slots: rank 3 A/B on every slot, same outputs from both graphs
    outputs = []
    for path in (fast.path, full.path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = _feed(session, 96)
        # slot inputs have zero-rank defaults: ONNX Runtime lists them as overridable initializers
        slots = session.get_overridable_initializers()
        assert len(slots) == 2 * 2 * 4
        for n, i in enumerate(slots):
            rng = np.random.default_rng(n)
            if i.name.endswith(".lora_A"):
                feed[i.name] = rng.standard_normal((i.shape[0], 3)).astype(np.float32)
            elif i.name.endswith(".lora_B"):
                feed[i.name] = rng.standard_normal((3, i.shape[1])).astype(np.float32)
        outputs.append(session.run(None, feed))
    for a, b in zip(*outputs, strict=True):
        assert np.array_equal(a, b)
    plain = ort.InferenceSession(str(full.path), providers=["CPUExecutionProvider"])
    assert not np.array_equal(plain.run(None, _feed(plain, 96))[0], outputs[1][0])  # slots used


def test_a_layer_pattern_whose_last_layer_is_new_is_traced_whole(tmp_path):
    # Gemma 3 with a sliding layer, then a global one: nothing left to repeat
    base = tiny_families.gemma3(tmp_path / "base", layers=2)
    result = export_onnx(base, tmp_path / "m.onnx")
    assert result.traced == "every layer traced: the last layer is the first of its kind"


def test_plan_depth():
    # the first layer of each kind is its template; the second is the fallback's
    assert plan_depth(["a"] * 24) == (1, {"a": 0})
    assert plan_depth(["a"] * 24, 2) == (2, {"a": 1})
    assert plan_depth(["a"] * 2) == (1, {"a": 0})
    assert plan_depth(["a"] * 2, 2) is None  # nothing saved
    assert plan_depth(["s", "f"] * 6) == (2, {"s": 0, "f": 1})
    assert plan_depth(["s", "f"] * 6, 2) == (4, {"s": 2, "f": 3})
    # Gemma 3's five sliding layers to one global one
    kinds = (["s"] * 5 + ["f"]) * 6
    assert plan_depth(kinds) == (6, {"s": 0, "f": 5})
    assert plan_depth(kinds, 2) == (12, {"s": 1, "f": 11})
    # one full layer, then sliding ones: only the first has no second to copy
    assert plan_depth(["f"] + ["s"] * 10) == (2, {"f": 0, "s": 1})
    assert plan_depth(["f"] + ["s"] * 10, 2) is None
    assert plan_depth(["s", "s", "f"]) is None  # the last layer is the first of its kind


def test_reindex_renames_the_one_layer_token():
    known = {"past_key_values.7.key", "present.7.value"}
    assert reindex("past_key_values.2.key", 2, 7, known) == "past_key_values.7.key"
    assert reindex("input_ids", 2, 7, known) is None
    with pytest.raises(CannotRepeat, match="no counterpart"):
        reindex("present.2.key", 2, 7, known)
    with pytest.raises(CannotRepeat, match="more than once"):
        reindex("cache.2.2", 2, 7, known)


def test_int4_base_with_lora_slots(tmp_path):
    """Adapters switched on an int4 base: MatMulNBits for the base, float slots beside it, and
    an adapter in the slots moves the outputs as it does on the float slot graph."""
    import json

    from cli_harness import run_cli

    base = tiny_models.llama(tmp_path / "base", layers=2)
    run = run_cli("export", base, "--lora-slots", "--targets", "q_proj,v_proj", "--dtype", "int4",
                  "-o", tmp_path / "slots4.onnx", "--verify", "--json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert report["dtype"] == "int4" and 0.9 <= report["cosine"] <= 1
    model = onnx.load(str(tmp_path / "slots4.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 * 7
    float_run = run_cli("export", base, "--lora-slots", "--targets", "q_proj,v_proj",
                        "-o", tmp_path / "slots.onnx")
    assert float_run.code == 0, float_run.err
    deltas = []
    for path in (tmp_path / "slots4.onnx", tmp_path / "slots.onnx"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ids = np.array([[3, 9, 27, 81, 5]], dtype=np.int64)
        plain = session.run(None, tiny_models.feed(session, ids))[0]
        feed = tiny_models.feed(session, ids)
        for n, i in enumerate(session.get_overridable_initializers()):
            rng = np.random.default_rng(n)
            if i.name.endswith(".lora_A"):
                feed[i.name] = 0.3 * rng.standard_normal((i.shape[0], 4)).astype(np.float32)
            elif i.name.endswith(".lora_B"):
                feed[i.name] = 0.3 * rng.standard_normal((4, i.shape[1])).astype(np.float32)
        deltas.append(session.run(None, feed)[0] - plain)
    from loraformat.export.onnx import cosine

    assert np.abs(deltas[1]).max() > 0.05  # the adapter changes the outputs
    assert cosine(deltas[0], deltas[1]) >= 0.9  # and by about as much on the int4 base


class _Gated:
    """A stack whose layers read, beside the hidden state, a context computed once before them
    and shaped like it (``skip``: the embeddings themselves, an "x0" skip connection)."""

    @staticmethod
    def module(depth: int, state: dict | None = None, skip: bool = False):
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.mix, self.gate = nn.Linear(8, 8), nn.Linear(8, 8)

            def forward(self, x, context):
                return x + self.mix(x) * torch.sigmoid(self.gate(context))

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(16, 8)
                self.context = nn.Identity() if skip else nn.Linear(8, 8)
                self.layers = nn.ModuleList(Block() for _ in range(depth))
                self.head = nn.Linear(8, 16)

            def forward(self, input_ids):
                x = self.embed(input_ids)
                context = self.context(x)
                for layer in self.layers:
                    x = layer(x, context)
                return self.head(x)

        torch.manual_seed(0)
        net = Net().eval()
        if state is not None:
            net.load_state_dict(state)
        return net

    @staticmethod
    def export_model(module):
        import torch

        from loraformat.architecture import ExportModel

        return ExportModel(
            module=module, example_inputs={"input_ids": torch.tensor([[1, 2, 3]])},
            input_names=["input_ids"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "logits": {0: "batch", 1: "sequence"}},
        )


@pytest.mark.parametrize(("skip", "kinds", "traced"), [
    # layer 0 reads two values that could be its hidden state: the second layer is the template
    (False, ("a",) * 4, "2 of 4 layers traced, the rest repeated "
                        "(not 1 traced, layer 0 reads 2 values like its hidden state)"),
    # layer 0 reads its hidden state in two roles, which no graph shows: by the contract
    # (spec/PLUGINS.md §6.1) it is a kind of its own, and layer 1 the template of the rest
    (True, ("first",) + ("a",) * 3, "2 of 4 layers traced, the rest repeated"),
    # a plugin that does not say so: layer 0 is given one tensor twice, which the exporter sees
    (True, ("a",) * 4, "2 of 4 layers traced, the rest repeated "
                       "(not 1 traced, layer 0 is given one tensor in two arguments)"),
])
def test_a_first_layer_that_cannot_stand_for_the_others(skip, kinds, traced, tmp_path):
    import onnx_ir as ir

    from loraformat.architecture import LayerRepeat
    from loraformat.export.onnx import export_graph
    from loraformat.export.repeat import cut_to_depth, repeated_graph

    full_module = _Gated.module(4, skip=skip)
    state = full_module.state_dict()
    shapes = {n: tuple(t.shape) for n, t in state.items()}

    def build_at(depth: int, path: str):
        assert path == "layers"
        cut = {n: state[n] for n in cut_to_depth(list(state), path, depth)}
        return _Gated.export_model(_Gated.module(depth, cut, skip=skip))

    full = _Gated.export_model(full_module)
    def trace(small, keep, annotate):
        graph = export_graph(small, keep)
        annotate(graph)
        return graph

    graph, how = repeated_graph(full, LayerRepeat(kinds=kinds), shapes, build_at, trace)
    assert how == traced
    want = export_graph(full, set(state))
    for name, tensor in state.items():  # the copies' weights: the checkpoint's, by name
        graph.graph.initializers[name].const_value = ir.tensor(tensor.numpy())
    ir.save(graph, tmp_path / "repeated.onnx")
    ir.save(want, tmp_path / "full.onnx")
    assert canonical(tmp_path / "repeated.onnx") == canonical(tmp_path / "full.onnx")
    ids = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], dtype=np.int64)
    sessions = [ort.InferenceSession(str(tmp_path / p), providers=["CPUExecutionProvider"])
                for p in ("repeated.onnx", "full.onnx")]
    got, expected = (s.run(None, tiny_models.feed(s, ids))[0] for s in sessions)
    assert np.array_equal(got, expected)
    import torch

    with torch.no_grad():  # and the graph computes the module
        reference = full_module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
