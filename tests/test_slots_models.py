"""LoRA-slot export of GPT-2 and LLaMA, run through runtime.Session, against transformers.

One slot export per architecture (module-scoped). The reference is the transformers model with
ΔW = scale·B·A merged into its weights by the documented formula, in the checkpoint's storage
layout (GPT-2's Conv1D stores [in, out], so ΔWᵀ is added there) — computed here in numpy, not by
loraformat. Must hold to 1e-4 in fp32:
- no adapter active → the base model;
- adapter X → the X-merged model (for GPT-2 X includes a fused c_attn adapter on q and v only);
- X and Y (different layers) active together → the model with both merged;
- threads running different adapters at once each get their own model's output.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import loraformat
from loraformat import LoraLayer
from loraformat.base import open_base
from loraformat.export.slots import export_with_slots
from loraformat.runtime import Session

pytestmark = pytest.mark.slow

ARCHS = ["gpt2", "llama"]


def _random_layer(layer, rank, rng, out_rows=None):
    rows = layer.out_features if out_rows is None else sum(b - a for a, b in out_rows)
    return LoraLayer(
        A=(rng.standard_normal((rank, layer.in_features)) * 0.2).astype(np.float32),
        B=(rng.standard_normal((rows, rank)) * 0.2).astype(np.float32),
        alpha=float(2 * rank),
        in_features=layer.in_features,
        out_features=layer.out_features,
        out_rows=out_rows,
    )


def _plan(architecture, layers):
    """Layer paths (and fused rows) of adapters X and Y; disjoint, both in several blocks."""
    paths = list(layers)
    if architecture == "gpt2":
        attn = [p for p in paths if p.endswith("attn.c_attn")]
        hidden = layers[attn[0]].in_features
        x = {attn[0]: [(0, hidden), (2 * hidden, 3 * hidden)]}  # q and v rows only
        x.update({p: None for p in paths if p.endswith("mlp.c_fc")})
        y = {p: None for p in paths if p.endswith(("attn.c_proj", "mlp.c_proj"))}
        y.update({attn[1]: None})
    else:
        x = {p: None for p in paths if p.endswith(("q_proj", "v_proj", "down_proj"))}
        y = {p: None for p in paths if p.endswith(("k_proj", "o_proj", "gate_proj", "up_proj"))}
    return x, y


def _make_adapter(architecture, layers, plan, seed):
    rng = np.random.default_rng(seed)
    built = {
        path: _random_layer(layers[path], rank, rng, rows)
        for rank, (path, rows) in zip([2, 3, 4, 5] * 8, plan.items(), strict=False)
    }
    return loraformat.Adapter.from_layers(architecture, built), built


def _merged_reference(base_path, architecture, layers, adapters, input_ids):
    """transformers logits with every (LoraLayer dict) in ``adapters`` merged in numpy."""
    import tiny_models

    model = tiny_models.load_transformers(base_path, architecture)
    state = model.state_dict()
    with torch.no_grad():
        for built in adapters:
            for path, lora in built.items():
                scale = lora.alpha / lora.A.shape[0]
                delta = np.zeros((lora.out_features, lora.in_features), np.float64)
                rows = (
                    np.arange(lora.out_features)
                    if lora.out_rows is None
                    else np.concatenate([np.arange(a, b) for a, b in lora.out_rows])
                )
                delta[rows] = scale * (lora.B.astype(np.float64) @ lora.A.astype(np.float64))
                if layers[path].layout == "in_out":
                    delta = delta.T
                weight = state[path + ".weight"]
                assert tuple(weight.shape) == delta.shape
                weight.add_(torch.from_numpy(delta).to(weight.dtype))
        kwargs = {"use_cache": False}
        return model(torch.from_numpy(input_ids), **kwargs).logits.numpy()


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tiny_checkpoint, tmp_path_factory):
    architecture = request.param
    base_path = tiny_checkpoint(architecture)
    out = tmp_path_factory.mktemp(f"{architecture}-slots") / "base.onnx"
    result = export_with_slots(base_path, out)
    with open_base(base_path) as base:
        layers = {p: base.layers[p] for p in result.slots}
    plan_x, plan_y = _plan(architecture, layers)
    x, x_layers = _make_adapter(architecture, layers, plan_x, seed=11)
    y, y_layers = _make_adapter(architecture, layers, plan_y, seed=12)
    adapter_dir = tmp_path_factory.mktemp(f"{architecture}-adapters")
    x_path = x.save(adapter_dir / "x")
    y_path = y.save(adapter_dir / "y.safetensors")
    ids = np.random.default_rng(3).integers(0, 96, (2, 7)).astype(np.int64)
    refs = {
        None: _merged_reference(base_path, architecture, layers, [], ids),
        "x": _merged_reference(base_path, architecture, layers, [x_layers], ids),
        "y": _merged_reference(base_path, architecture, layers, [y_layers], ids),
        "xy": _merged_reference(base_path, architecture, layers, [x_layers, y_layers], ids),
    }
    session = Session(result.path)
    session.load("x", x_path)
    session.load("y", y_path)
    yield {
        "arch": architecture,
        "session": session,
        "ids": ids,
        "refs": refs,
        "result": result,
        "adapter_paths": {"x": x_path, "y": y_path},
    }
    session.close()


def test_every_linear_layer_has_a_slot(setup, tiny_checkpoint):
    with open_base(tiny_checkpoint(setup["arch"])) as base:
        linear = [p for p, layer in base.layers.items() if layer.kind == "linear"]
    assert setup["result"].slots == linear
    assert set(setup["session"].slots) == set(linear)


def test_no_adapter_equals_base(setup):
    out = setup["session"].run({"input_ids": setup["ids"]})[0]
    np.testing.assert_allclose(out, setup["refs"][None], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["x", "y"])
def test_adapter_equals_merged(setup, name):
    refs = setup["refs"]
    out = setup["session"].run({"input_ids": setup["ids"]}, adapter=name)[0]
    np.testing.assert_allclose(out, refs[name], atol=1e-4, rtol=0)
    assert np.abs(refs[name] - refs[None]).max() > 1e-2  # the adapter really changes the model


def test_two_adapters_equal_both_merged(setup):
    refs = setup["refs"]
    out = setup["session"].run({"input_ids": setup["ids"]}, adapter=["x", "y"])[0]
    np.testing.assert_allclose(out, refs["xy"], atol=1e-4, rtol=0)
    assert np.abs(refs["xy"] - refs["x"]).max() > 1e-2


def test_threads_get_their_own_adapter(setup):
    session, ids, refs = setup["session"], setup["ids"], setup["refs"]
    choices = [(None, None), ("x", "x"), ("y", "y"), (["x", "y"], "xy")] * 2
    errors: list[str] = []
    barrier = threading.Barrier(len(choices))

    def worker(adapter, key):
        barrier.wait()
        for _ in range(15):
            out = session.run({"input_ids": ids}, adapter=adapter)[0]
            diff = float(np.abs(out - refs[key]).max())
            if diff > 1e-4:
                errors.append(f"{adapter}: max diff {diff}")
                return

    threads = [threading.Thread(target=worker, args=c) for c in choices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_peft_adapter_loaded_directly_equals_peft(setup, tiny_checkpoint, tmp_path):
    """A real PEFT adapter (GPT-2: fan_in_fan_out on c_attn and c_proj), loaded from its directory
    through the interchange, gives PeftModel's own outputs."""
    import tiny_models
    from peft import PeftModel

    architecture = setup["arch"]
    base_path = tiny_checkpoint(architecture)
    lora = (
        {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}
        if architecture == "gpt2"
        else {"target_modules": ["q_proj", "v_proj", "up_proj"], "use_rslora": True}
    )
    peft_dir = tiny_models.peft_adapter(base_path, architecture, tmp_path / "peft", seed=5, **lora)
    model = PeftModel.from_pretrained(
        tiny_models.load_transformers(base_path, architecture), peft_dir
    )
    with torch.no_grad():
        want = model(torch.from_numpy(setup["ids"]), use_cache=False).logits.numpy()
    session = setup["session"]
    session.load("peft", peft_dir)
    try:
        got = session.run({"input_ids": setup["ids"]}, adapter="peft")[0]
    finally:
        session.unload("peft")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want - setup["refs"][None]).max() > 1e-2


def test_converted_onnx_adapter_file(setup, tmp_path):
    """`loraformat convert x -o x.onnx_adapter` output, memory-mapped by ORT as is."""
    from loraformat.interchange import convert

    x_path = setup["adapter_paths"]["x"]
    out = tmp_path / "x.onnx_adapter"
    convert(x_path, out)
    session = setup["session"]
    loaded = session.load("x_file", out)
    try:
        assert loaded.layers == {p: r for p, r in session.adapter("x").layers.items()}
        got = session.run({"input_ids": setup["ids"]}, adapter="x_file")[0]
    finally:
        session.unload("x_file")
    np.testing.assert_allclose(got, setup["refs"]["x"], atol=1e-4, rtol=0)


def test_kv_cache_graph_with_adapter(setup, tiny_checkpoint, tmp_path):
    """with_past: a prompt run in two steps through the KV cache, adapter X active in both,
    gives the X-merged model's logits (the first step starts from an empty cache)."""
    if setup["arch"] != "llama":
        pytest.skip("one KV-cache export is enough for the suite's time: LLaMA (GQA, rope)")
    result = export_with_slots(
        tiny_checkpoint(setup["arch"]), tmp_path / "past.onnx", with_past=True
    )
    ids, want = setup["ids"], setup["refs"]["x"]
    with Session(result.path) as session:
        session.load("x", setup["adapter_paths"]["x"])
        shapes = {i.name: i.shape for i in session.inner.get_inputs()}
        past = {
            name: np.zeros((ids.shape[0], shape[1], 0, shape[3]), np.float32)
            for name, shape in shapes.items()
            if name.startswith("past_key_values.")
        }
        assert len(past) == 4  # two layers, key and value
        logits = []
        for start, stop in ((0, 4), (4, ids.shape[1])):
            tokens = ids[:, start:stop]
            positions = np.broadcast_to(np.arange(start, stop), tokens.shape)
            feed = {
                "input_ids": tokens,
                "attention_mask": np.ones((ids.shape[0], stop), np.int64),
                "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
                **past,
            }
            out = session.run(feed, adapter="x")
            logits.append(out[0])
            presents = dict(zip(session.output_names[1:], out[1:], strict=True))
            past = {n.replace("present.", "past_key_values."): v for n, v in presents.items()}
    np.testing.assert_allclose(np.concatenate(logits, axis=1), want, atol=1e-4, rtol=0)
