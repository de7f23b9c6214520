"""loraformat.runtime.Session on a hand-built slot graph, against numpy with merged weights.

The graph is two dense layers (weights stored [in, out], as ONNX MatMul takes them) with LoRA
slots ``blk.0.fc`` and ``blk.1.fc`` plus zero-rank default initializers — what
``export --lora-slots`` produces, without torch. The reference merges ΔW = scale·B·A into W in
numpy, independently of the session's own conversion.
"""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as oh
from onnx import numpy_helper as onh

import loraformat
from loraformat import LoraformatError, LoraLayer
from loraformat.runtime import Session

IN, HID, OUT = 8, 12, 6
L0, L1 = "blk.0.fc", "blk.1.fc"
RNG = np.random.default_rng(0)
W0 = RNG.standard_normal((IN, HID)).astype(np.float32)  # stored [in, out]
B0 = RNG.standard_normal(HID).astype(np.float32)
W1 = RNG.standard_normal((HID, OUT)).astype(np.float32)


def _build_graph(path, dtype=np.float32) -> None:
    elem = onh.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inputs, inits = [], [oh.make_tensor_value_info("x", elem, ["batch", IN])], []
    x = "x"
    for i, (layer, w, fan_in, fan_out) in enumerate(((L0, W0, IN, HID), (L1, W1, HID, OUT))):
        a, b = layer + ".lora_A", layer + ".lora_B"
        inputs += [
            oh.make_tensor_value_info(a, elem, [fan_in, f"rank_{i}"]),
            oh.make_tensor_value_info(b, elem, [f"rank_{i}", fan_out]),
        ]
        inits += [
            onh.from_array(w.astype(dtype), layer + ".weight"),
            onh.from_array(np.zeros((fan_in, 0), dtype), a),
            onh.from_array(np.zeros((0, fan_out), dtype), b),
        ]
        nodes += [
            oh.make_node("MatMul", [x, layer + ".weight"], [f"y{i}"]),
            oh.make_node("MatMul", [x, a], [f"xa{i}"]),
            oh.make_node("MatMul", [f"xa{i}", b], [f"d{i}"]),
            oh.make_node("Add", [f"y{i}", f"d{i}"], [f"s{i}"]),
        ]
        if i == 0:
            inits.append(onh.from_array(B0.astype(dtype), layer + ".bias"))
            nodes += [
                oh.make_node("Add", ["s0", layer + ".bias"], ["h0"]),
                oh.make_node("Relu", ["h0"], ["r0"]),
            ]
            x = "r0"
    graph = oh.make_graph(
        nodes, "slots", inputs, [oh.make_tensor_value_info("s1", elem, ["batch", OUT])], inits
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    model.metadata_props.add(key="loraformat.architecture", value="toy")
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _reference(x, deltas=None):
    """numpy forward with ΔW (math orientation, out×in) added to the stored [in, out] weights."""
    deltas = deltas or {}
    w0 = W0 + deltas.get(L0, np.zeros((HID, IN))).T
    w1 = W1 + deltas.get(L1, np.zeros((OUT, HID))).T
    h = np.maximum(x.astype(np.float64) @ w0 + B0, 0)
    return h @ w1


def _layer(fan_in, fan_out, rank, seed, out_rows=None, **extra):
    rng = np.random.default_rng(seed)
    rows = fan_out if out_rows is None else sum(b - a for a, b in out_rows)
    return LoraLayer(
        A=rng.standard_normal((rank, fan_in)).astype(np.float32),
        B=rng.standard_normal((rows, rank)).astype(np.float32),
        alpha=2.0 * rank,
        in_features=fan_in,
        out_features=fan_out,
        out_rows=out_rows,
        **extra,
    )


def _adapter(layers, architecture="toy"):
    return loraformat.Adapter.from_layers(architecture, layers)


def _deltas(adapter):
    return {path: adapter.delta(path, np.float64) for path in adapter.layer_paths}


def _write_onnx_adapter(path, params) -> None:
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(1)
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    writer.export_adapter(str(path))


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime") / "slots.onnx"
    _build_graph(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """X on layer 0 (saved as a directory), Y on layer 1 (single file), Z on both, F fused rows."""
    root = tmp_path_factory.mktemp("adapters")
    x = _adapter({L0: _layer(IN, HID, 4, 1)})
    y = _adapter({L1: _layer(HID, OUT, 3, 2)})
    z = _adapter({L0: _layer(IN, HID, 2, 3), L1: _layer(HID, OUT, 5, 4)})
    f = _adapter({L0: _layer(IN, HID, 2, 5, out_rows=[(0, 4), (8, 12)])})
    paths = {"X": x.save(root / "x"), "Y": y.save(root / "y.safetensors"), "Z": z.save(root / "z")}
    paths["F"] = f.save(root / "f")
    return {name: (path, _deltas(loraformat.load(path))) for name, path in paths.items()}


@pytest.fixture(scope="module")
def session(graph, adapters):
    with Session(graph) as s:
        for name, (path, _) in adapters.items():
            s.load(name, path)
        yield s


def _x(seed=0, batch=3):
    return np.random.default_rng(100 + seed).standard_normal((batch, IN)).astype(np.float32)


def test_slots_are_found(session):
    assert set(session.slots) == {L0, L1}
    assert (session.slots[L0].in_features, session.slots[L0].out_features) == (IN, HID)
    assert session.input_names == ["x"]
    assert session.architecture == "toy"


def test_no_adapter_is_the_base(session):
    x = _x()
    np.testing.assert_allclose(session.run({"x": x})[0], _reference(x), atol=1e-4)


@pytest.mark.parametrize("name", ["X", "Y", "Z", "F"])
def test_one_adapter_equals_merged(session, adapters, name):
    x = _x(1)
    out = session.run({"x": x}, adapter=name)[0]
    np.testing.assert_allclose(out, _reference(x, adapters[name][1]), atol=1e-4)
    # and it is really different from the base
    assert np.abs(out - _reference(x)).max() > 1e-2


def test_two_adapters_on_different_layers(session, adapters):
    x = _x(2)
    both = {**adapters["X"][1], **adapters["Y"][1]}
    np.testing.assert_allclose(
        session.run({"x": x}, adapter=["X", "Y"])[0], _reference(x, both), atol=1e-4
    )


def test_overlapping_adapters_are_refused(session):
    with pytest.raises(LoraformatError, match=r"adapters 'X' and 'Z' both adapt blk\.0\.fc"):
        session.run({"x": _x()}, adapter=["X", "Z"])


def test_onnx_adapter_file_gives_the_same(tmp_path, graph, adapters):
    lf = loraformat.load(adapters["Z"][0])
    params = {}
    for path in lf.layer_paths:
        layer = lf.layer(path)
        params[path + ".lora_A"] = np.ascontiguousarray(layer.A.T)
        params[path + ".lora_B"] = np.ascontiguousarray((layer.B * np.float32(lf.scale(path))).T)
    _write_onnx_adapter(tmp_path / "z.onnx_adapter", params)
    x = _x(3)
    with Session(graph) as s:
        loaded = s.load("z", tmp_path / "z.onnx_adapter")
        assert loaded.layers == {L0: 2, L1: 5}
        np.testing.assert_allclose(
            s.run({"x": x}, adapter="z")[0], _reference(x, adapters["Z"][1]), atol=1e-4
        )


def test_in_memory_adapter_and_unload(graph):
    adapter = _adapter({L1: _layer(HID, OUT, 2, 9)})
    x = _x(4)
    with Session(graph) as s:
        s.load("mem", adapter)
        assert s.adapters == ["mem"]
        np.testing.assert_allclose(
            s.run({"x": x}, adapter="mem")[0], _reference(x, _deltas(adapter)), atol=1e-4
        )
        s.unload("mem")
        assert s.adapters == []
        with pytest.raises(
            LoraformatError, match=r"no adapter named 'mem' is loaded \(loaded: none\)"
        ):
            s.run({"x": x}, adapter="mem")
        with pytest.raises(LoraformatError, match="no adapter named 'mem'"):
            s.unload("mem")


def test_threads_with_different_adapters(session, adapters):
    """Eight threads, each looping over its own adapter choice, all sharing one session."""
    choices = [None, "X", "Y", "Z", "F", ["X", "Y"], ["F", "Y"], "Z"]
    inputs = {i: _x(10 + i, batch=2) for i in range(len(choices))}
    expected = {}
    for i, choice in enumerate(choices):
        names = [] if choice is None else [choice] if isinstance(choice, str) else choice
        deltas = {k: v for n in names for k, v in adapters[n][1].items()}
        expected[i] = _reference(inputs[i], deltas)
    errors: list[str] = []
    barrier = threading.Barrier(len(choices))

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(40):
            out = session.run({"x": inputs[i]}, adapter=choices[i])[0]
            if not np.allclose(out, expected[i], atol=1e-4):
                errors.append(
                    f"thread {i} ({choices[i]}): max diff {np.abs(out - expected[i]).max()}"
                )
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(choices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_load_and_unload_while_others_run(graph, adapters):
    """Loading/unloading adapters in one thread does not disturb runs in others."""
    x = _x(5)
    with Session(graph) as s:
        s.load("X", adapters["X"][0])
        want = _reference(x, adapters["X"][1])
        stop = threading.Event()
        errors: list[str] = []

        def churn() -> None:
            i = 0
            while not stop.is_set():
                s.load(f"tmp{i}", adapters["Y"][0])
                s.unload(f"tmp{i}")
                i += 1

        def runner() -> None:
            for _ in range(50):
                out = s.run({"x": x}, adapter="X")[0]
                if not np.allclose(out, want, atol=1e-4):
                    errors.append("wrong output")

        churner = threading.Thread(target=churn)
        runners = [threading.Thread(target=runner) for _ in range(3)]
        churner.start()
        for t in runners:
            t.start()
        for t in runners:
            t.join()
        stop.set()
        churner.join()
        assert errors == []
        assert s.adapters == ["X"]


# -- refusals -----------------------------------------------------------------------------------


def test_duplicate_name_refused(graph, adapters):
    with Session(graph) as s:
        s.load("X", adapters["X"][0])
        with pytest.raises(LoraformatError, match="an adapter named 'X' is already loaded"):
            s.load("X", adapters["Y"][0])


def test_layer_without_slot_refused(graph, tmp_path):
    bad = _adapter({"blk.2.fc": _layer(IN, HID, 2, 1)}).save(tmp_path / "bad")
    with Session(graph) as s, pytest.raises(LoraformatError) as info:
        s.load("bad", bad)
    assert str(info.value) == (
        f"{bad}: layer blk.2.fc has no LoRA slot in slots.onnx (slots: blk.0.fc, blk.1.fc)"
    )


def test_wrong_shape_refused(graph, tmp_path):
    bad = _adapter({L0: _layer(IN + 1, HID, 2, 1)}).save(tmp_path / "bad")
    with (
        Session(graph) as s,
        pytest.raises(
            LoraformatError, match=r"blk\.0\.fc is 9→12, the slot in slots\.onnx is 8→12"
        ),
    ):
        s.load("bad", bad)


def test_dora_and_architecture_refused(graph, tmp_path):
    magnitude = np.full(HID, 3.0, np.float32)
    dora_adapter = _adapter({L0: _layer(IN, HID, 2, 1, magnitude=magnitude)})
    dora = dora_adapter.save(tmp_path / "d")
    other = _adapter({L0: _layer(IN, HID, 2, 1)}, architecture="llama").save(tmp_path / "o")
    with Session(graph) as s:
        with pytest.raises(LoraformatError) as info:
            s.load("d", dora)
        assert str(info.value).startswith(
            f"{dora}: cannot be carried to an ONNX Runtime adapter without loss: DoRA magnitudes "
            "on 1 layer(s) (e.g. blk.0.fc)"
        )
        with pytest.raises(
            LoraformatError, match=r"adapter is for 'llama', slots\.onnx is a 'toy' model"
        ):
            s.load("o", other)
        assert s.adapters == []
        # lossy: the magnitudes are dropped, the low-rank part is kept
        s.load("d", dora, lossy=True)
        x = _x(7)
        want = _reference(x, {L0: dora_adapter.delta(L0, np.float64)})
        np.testing.assert_allclose(s.run({"x": x}, adapter="d")[0], want, atol=1e-4)


def test_onnx_adapter_refusals(graph, tmp_path):
    a = np.ones((IN, 2), np.float32)
    b = np.ones((2, HID), np.float32)
    cases = {
        "half": (
            {L0 + ".lora_A": a.astype(np.float16), L0 + ".lora_B": b.astype(np.float16)},
            "parameter blk.0.fc.lora_A is tensor(float16), the graph's slot is tensor(float) "
            "(ONNX Runtime does not cast adapter parameters)",
        ),
        "lonely": (
            {L0 + ".lora_A": a},
            "parameter blk.0.fc.lora_A has no matching blk.0.fc.lora_B",
        ),
        "shape": (
            {L0 + ".lora_A": np.ones((IN + 1, 2), np.float32), L0 + ".lora_B": b},
            "parameter blk.0.fc.lora_A has shape [9, 2], the slot takes [8, 'r']",
        ),
        "rank": (
            {L0 + ".lora_A": a, L0 + ".lora_B": np.ones((3, HID), np.float32)},
            "blk.0.fc.lora_A and .lora_B disagree on the rank (2 vs 3)",
        ),
        "name": ({"blk.0.fc.weight": a}, "parameter 'blk.0.fc.weight' is not a LoRA slot input"),
    }
    with Session(graph) as s:
        for case, (params, message) in cases.items():
            path = tmp_path / f"{case}.onnx_adapter"
            _write_onnx_adapter(path, params)
            with pytest.raises(LoraformatError) as info:
                s.load(case, path)
            assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
        garbage = tmp_path / "garbage.onnx_adapter"
        garbage.write_bytes(b"not an adapter" * 8)
        with pytest.raises(LoraformatError, match="not a readable ONNX Runtime adapter"):
            s.load("g", garbage)
        with pytest.raises(LoraformatError, match="adapter not found"):
            s.load("m", tmp_path / "missing.onnx_adapter")
        assert s.adapters == []


def test_missing_model_refused(tmp_path):
    with pytest.raises(LoraformatError, match="ONNX model not found"):
        Session(tmp_path / "none.onnx")


def test_float16_graph_casts_loraformat_adapters(tmp_path):
    path = tmp_path / "half.onnx"
    _build_graph(path, np.float16)
    adapter = _adapter({L0: _layer(IN, HID, 2, 7)})
    x = _x(6)
    with Session(path) as s:
        s.load("a", adapter)
        out = s.run({"x": x.astype(np.float16)}, adapter="a")[0]
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, _reference(x, _deltas(adapter)), rtol=2e-2, atol=5e-2)
