"""Merging into an int4 ONNX model: MatMulNBits weights written by ONNX Runtime's own quantizer
are dequantized, merged and requantized (checked against the codec, which is bit-exact with ONNX
Runtime), untouched tensors and nodes are kept, the merged model runs in ONNX Runtime close to
PEFT's fp32 merge, and the survival report says what the adapter kept."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import tiny_models
from onnx import numpy_helper
from test_cli_errors import assert_one_line_error, run
from test_export import node_list
from test_merge import logits, model_inputs

from loraformat.export.onnx import export_onnx
from loraformat.interchange import open_adapter
from loraformat.merge.onnx_surgery import merge_onnx
from loraformat.quant import matmulnbits

pytestmark = pytest.mark.slow  # ONNX export, PEFT references

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = 32


def fold_transposes(model: onnx.ModelProto) -> None:
    """``MatMul(x, Transpose(W))`` → ``MatMul(x, W)`` with W stored transposed under its own name,
    so ONNX Runtime's quantizer (which takes only an initializer B) sees every linear layer and
    names its outputs after the checkpoint tensor (``<W>_Q4``)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    drop = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        users = [(n, i) for n in graph.node for i, x in enumerate(n.input) if x == node.output[0]]
        if not users or any(n.op_type != "MatMul" or i != 1 for n, i in users):
            continue
        tensor = inits[node.input[0]]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).T.copy(),
                                                tensor.name))
        for user, i in users:
            user.input[i] = node.input[0]
        drop.append(node)
    for node in drop:
        graph.node.remove(node)


def quantize_with_ort(float_onnx: Path, out: Path, symmetric: bool, bits: int = 4) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(float_onnx))
    fold_transposes(model)
    # lm_head stays float, as `loraformat export --dtype int4` and most int4 deployments keep it
    # (it decides the logits directly); in a 32-wide model its int4 error alone costs ~0.005 of
    # logit cosine.
    head = [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] == "lm_head.weight"]
    assert len(head) == 1
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=symmetric,
                                     nodes_to_exclude=head)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return out


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def ort_logits(path: Path) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in model_inputs("llama").items() if k in names}
    return session.run(None, feed)[0]


def peft_deltas(adapter: Path) -> dict[str, np.ndarray]:
    """ΔW = scale·B·A per checkpoint weight name, from PEFT's own file and config."""
    from safetensors.numpy import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            b = tensors[stem + ".lora_B.weight"]
            name = stem.removeprefix("base_model.model.") + ".weight"
            out[name] = (scale * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)
    return out


def codes(packed: np.ndarray, bits: int = 4) -> np.ndarray:
    """The codes of packed B (4 bits: element 2i in the low nibble, 2i+1 in the high one)."""
    if bits == 8:
        return packed.reshape(packed.shape[0], -1)
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def stored(inits: dict[str, np.ndarray], name: str, k: int, symmetric: bool, bits: int = 4):
    packed = inits[f"{name}_Q{bits}"]
    n = packed.shape[0]
    zp = None if symmetric else inits[name + "_zero_points"].reshape(n, -1)
    return matmulnbits.QuantizedWeight(
        packed, inits[name + "_scales"].reshape(n, -1).astype(np.float32), zp, bits, BLOCK, k
    )


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    base = tiny_models.llama(root / "hf", rope_scaling=False)
    # lora_alpha 1 (scale 1/4): an adapter that changes the model (logit cosine to the base
    # ≈ 0.9) without swamping its weights, as trained adapters do
    adapter = tiny_models.peft_adapter(base, "llama", root / "peft", target_modules=PROJ,
                                       lora_alpha=1)
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_models.load_transformers(base, "llama"), adapter)
    reference = logits(model.merge_and_unload(), "llama")
    export_onnx(base, root / "float.onnx")
    folded = onnx.load(str(root / "float.onnx"))
    fold_transposes(folded)
    onnx.save(folded, str(root / "folded.onnx"))
    models = {
        sym: quantize_with_ort(root / "float.onnx", root / f"int4-{sym}.onnx", sym)
        for sym in (True, False)
    }
    return SimpleNamespace(base=base, adapter=adapter, reference=reference, models=models,
                           float_folded=root / "folded.onnx")


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_merge_requantizes_like_the_codec_and_runs(lm, tmp_path, symmetric):
    model = lm.models[symmetric]
    ops = {n.op_type for n in onnx.load(str(model)).graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # attention products stay MatMul
    out = tmp_path / "merged.onnx"
    result = merge_onnx(model, [open_adapter(lm.adapter)], out)
    assert result.layers == 14 and result.tensors_changed == 14
    before, after = initializers(model), initializers(out)
    assert set(after) == set(before)
    changed = set()
    mismatched = 0
    for name, delta in peft_deltas(lm.adapter).items():
        k = delta.shape[1]
        old = stored(before, name, k, symmetric)
        expected = matmulnbits.quantize(matmulnbits.dequantize(old) + delta, bits=4,
                                        block_size=BLOCK, symmetric=symmetric)
        got = stored(after, name, k, symmetric)
        parts = ["_Q4", "_scales"] + ([] if symmetric else ["_zero_points"])
        changed.update(name + p for p in parts)
        assert after[name + "_Q4"].shape == before[name + "_Q4"].shape
        assert after[name + "_scales"].dtype == before[name + "_scales"].dtype
        # ΔW from PEFT's A, B (float64 here) and loraformat's float32 merge differ in the last
        # bit: a block's extreme (hence its scale) may differ by an ulp, and a value may cross a
        # rounding boundary: scales to 1e-6, a few values one step off.
        np.testing.assert_allclose(got.scales, expected.scales, rtol=1e-6, err_msg=name)
        if not symmetric:
            np.testing.assert_array_equal(got.zero_points, expected.zero_points, err_msg=name)
        diff = matmulnbits.dequantize(got) - matmulnbits.dequantize(expected)
        mismatched += int(np.count_nonzero(codes(got.packed) != codes(expected.packed)))
        step = np.repeat(np.abs(got.scales), BLOCK, axis=1)[:, :k]
        assert np.all(np.abs(diff) <= step * 1.0001), name
        assert not np.array_equal(after[name + "_Q4"], before[name + "_Q4"]), name
    assert mismatched <= 3, mismatched
    raw_before = {t.name: t.SerializeToString() for t in onnx.load(str(model)).graph.initializer}
    raw_after = {t.name: t.SerializeToString() for t in onnx.load(str(out)).graph.initializer}
    for name in set(before) - changed:  # untouched: byte-identical (lm_head's blocks too)
        assert raw_after[name] == raw_before[name], name
    assert node_list(out) == node_list(model)
    # ONNX Runtime runs the merged int4 model close to PEFT's fp32 merge
    got = ort_logits(out).reshape(-1)
    ref = lm.reference.reshape(-1)
    cosine = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cosine >= 0.99, cosine
    unmerged = ort_logits(model).reshape(-1)
    assert cosine > float(unmerged @ ref / np.linalg.norm(unmerged) / np.linalg.norm(ref))
    # ...and computes exactly with the weights the file stores: a float graph holding the
    # dequantized merged weights gives the same logits
    dense = onnx.load(str(lm.float_folded))
    for tensor in dense.graph.initializer:
        if tensor.name + "_Q4" in after:
            k = int(tensor.dims[0])
            w = matmulnbits.dequantize(stored(after, tensor.name, k, symmetric))
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), tensor.name))
    onnx.save(dense, str(tmp_path / "dequantized.onnx"))
    np.testing.assert_allclose(ort_logits(out), ort_logits(tmp_path / "dequantized.onnx"),
                               rtol=0, atol=1e-5)
    report = result.survival
    assert report is not None and len(report.layers) == 14
    assert {layer.qtype for layer in report.layers} == {"int4s" if symmetric else "int4a"}


def test_survival_small_and_normal_adapter(lm, tmp_path):
    small = tiny_models.peft_adapter(lm.base, "llama", tmp_path / "small", seed=3,
                                     target_modules=["q_proj", "v_proj"], lora_alpha=0.02)
    model = lm.models[False]
    low = merge_onnx(model, [open_adapter(small)], tmp_path / "small.onnx").survival
    high = merge_onnx(model, [open_adapter(lm.adapter)], tmp_path / "normal.onnx").survival
    assert low.share < 0.2, low.table()
    assert high.share > 0.8, high.table()
    warning = low.warning()
    assert warning is not None and "model.layers.0.self_attn.q_proj.weight" in warning
    assert "--lora-slots" in warning
    assert high.warning() is None
    # the figures agree with their definitions, recomputed from the files and PEFT's A, B
    before, after = initializers(model), initializers(tmp_path / "small.onnx")
    deltas = peft_deltas(small)
    for layer in low.layers:
        delta = deltas[layer.name].astype(np.float64)
        k = delta.shape[1]
        w = matmulnbits.dequantize(stored(before, layer.name, k, False)).astype(np.float64)
        q = matmulnbits.dequantize(stored(after, layer.name, k, False)).astype(np.float64)
        assert layer.delta_norm == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        assert layer.carried == pytest.approx(np.vdot(q - w, delta), rel=1e-4, abs=1e-12)
        assert layer.error_norm == pytest.approx(np.linalg.norm(q - (w + delta)), rel=1e-4)


def test_cli_json_table_and_warning(lm, tmp_path):
    small = tiny_models.peft_adapter(lm.base, "llama", tmp_path / "small", seed=3,
                                     target_modules=["q_proj"], lora_alpha=0.02)
    model = lm.models[True]
    code, out, err = run("merge", model, small, "-o", tmp_path / "m.onnx", "--json",
                         inputs=[model])
    assert code == 0, err
    data = json.loads(out)
    assert data["tensors_changed"] == 2
    assert {layer["tensor"] for layer in data["survival"]["layers"]} == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    assert {layer["type"] for layer in data["survival"]["layers"]} == {"int4s"}
    assert data["survival"]["warning"] and data["survival"]["share"] < 0.5
    code, out, err = run("merge", model, small, "-o", tmp_path / "t.onnx", inputs=[model])
    assert code == 0, err
    assert "share" in out and "overall" in out and "warning:" in err and "--lora-slots" in err


def test_builder_names_and_bad_nodes_refused(lm, tmp_path):
    adapter = lm.adapter
    model = onnx.load(str(lm.models[True]))
    # ONNX Runtime GenAI's builder names weights after its nodes: refused in one line
    renamed = {}
    for t in model.graph.initializer:
        if t.name.startswith("model.layers.0.self_attn.q_proj.weight"):
            renamed[t.name] = t.name.replace("model.layers.0.self_attn.q_proj.weight",
                                              "/model/layers.0/attn/q_proj/MatMul.weight")
            t.name = renamed[t.name]
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            node.input[i] = renamed.get(x, x)
    builder = tmp_path / "builder.onnx"
    onnx.save(model, str(builder))
    assert_one_line_error(
        run("merge", builder, adapter, "-o", tmp_path / "b.onnx", inputs=[builder]), builder,
        "model.layers.0.self_attn.q_proj", "not named after the checkpoint", "_Q4",
    )
    assert not (tmp_path / "b.onnx").exists()
    # a MatMulNBits node whose attributes do not fit its initializers
    model = onnx.load(str(lm.models[True]))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1].startswith("model.layers.0.mlp.up"):
            for attr in node.attribute:
                if attr.name == "block_size":
                    attr.i = 16
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    assert_one_line_error(
        run("merge", broken, adapter, "-o", tmp_path / "x.onnx", inputs=[broken]), broken,
        "MatMulNBits node", "block_size=16",
    )


def test_unmerge_refused(lm, tmp_path):
    model = lm.models[False]
    assert_one_line_error(
        run("unmerge", model, lm.adapter, "-o", tmp_path / "u.onnx", inputs=[model]), model,
        "unmerge from MatMulNBits (int4/int8) weights is not supported",
    )
    assert not (tmp_path / "u.onnx").exists()


def test_lora_bias_on_a_quantized_layer_refused(lm, tmp_path):
    adapter = tiny_models.peft_adapter(lm.base, "llama", tmp_path / "bias",
                                       target_modules=["q_proj"], lora_bias=True)
    model = lm.models[True]
    assert_one_line_error(
        run("merge", model, adapter, "-o", tmp_path / "o.onnx", inputs=[model]), model,
        "'model.layers.0.self_attn.q_proj' is a MatMulNBits weight", "no lora_bias",
    )


def test_int8_with_float16_scales(lm, tmp_path):
    """A float16 model quantized to 8 bits: scales stay float16, blocks are the codec's."""
    export_onnx(lm.base, tmp_path / "f16.onnx", dtype="float16")
    model = quantize_with_ort(tmp_path / "f16.onnx", tmp_path / "int8.onnx", False, bits=8)
    out = tmp_path / "merged.onnx"
    result = merge_onnx(model, [open_adapter(lm.adapter)], out)
    assert {layer.qtype for layer in result.survival.layers} == {"int8a"}
    assert result.survival.share > 0.99 and result.survival.warning() is None
    before, after = initializers(model), initializers(out)
    mismatched = 0
    for name, delta in peft_deltas(lm.adapter).items():
        k = delta.shape[1]
        assert after[name + "_scales"].dtype == np.float16
        old = stored(before, name, k, False, bits=8)
        expected = matmulnbits.quantize(matmulnbits.dequantize(old) + delta, bits=8,
                                        block_size=BLOCK)
        np.testing.assert_allclose(after[name + "_scales"].reshape(expected.scales.shape),
                                   expected.scales.astype(np.float16), rtol=1e-3, err_msg=name)
        got = stored(after, name, k, False, bits=8)
        np.testing.assert_array_equal(got.zero_points, expected.zero_points, err_msg=name)
        mismatched += int(np.count_nonzero(codes(got.packed, 8) != codes(expected.packed, 8)))
    assert mismatched <= 3, mismatched
    assert node_list(out) == node_list(model)
    got = ort_logits(out).astype(np.float32).reshape(-1)
    ref = lm.reference.reshape(-1)
    assert float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref)) >= 0.999


def test_architecture_told_from_the_quantized_names(lm, tmp_path):
    """The weights' float names (``X`` of ``X_Q4``) tell the architecture: an adapter for another
    one is refused by name, not as a missing layer."""
    gpt2 = tiny_models.gpt2(tmp_path / "gpt2")
    other = tiny_models.peft_adapter(gpt2, "gpt2", tmp_path / "g", target_modules=["c_attn"])
    model = lm.models[True]
    assert_one_line_error(
        run("merge", model, other, "-o", tmp_path / "o.onnx", inputs=[model]), model,
        "adapter is for architecture 'gpt2'", "'llama'",
    )
