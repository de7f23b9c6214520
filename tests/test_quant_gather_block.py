"""int4 embedding tables as GatherBlockQuantized (loraformat/quant/gather_block.py and
--quantize-embeddings): bit-exact with ONNX Runtime's own Gather quantizer, gathered exactly by its
kernel, and an int4 export with quantized embeddings close to fp32."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tiny_families
import tiny_models
from cli_harness import run_cli
from onnx import TensorProto, helper, numpy_helper

from loraformat.export.onnx import cosine, export_onnx
from loraformat.export.quantize import QuantOptions
from loraformat.quant.gather_block import dequantize_table, quantize_table


def _table(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    t = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    t[1, :32] = 0.0  # a zero block: scale 0
    t[2, :32] = 0.75  # one positive value: asymmetric lo clamps to 0
    t[3, :4] = [0.5, -0.5, 1.5, -2.5]  # halves
    t[4, 32:64] = np.linspace(-1, 1, 32, dtype=np.float32)  # values on the grid's halves
    return t


def _packed(values: np.ndarray, symmetric: bool) -> bytes:
    """The bytes an initializer of these 4-bit values holds (low nibble first)."""
    return ir.Tensor(values.astype(ml_dtypes.int4 if symmetric else ml_dtypes.uint4)).tobytes()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_bit_exact_against_onnxruntime_gather_quantizer(symmetric, block):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    table = _table(40, 128)
    data, scales, zp = DefaultWeightOnlyQuantizer.quantize_ndarray(table, 1, block, symmetric)
    ours = quantize_table(table, block, symmetric)
    assert _packed(ours.data, symmetric) == np.asarray(data).tobytes()
    np.testing.assert_array_equal(ours.scales, scales)
    if symmetric:
        assert zp is None and ours.zero_points is None
    else:
        assert _packed(ours.zero_points, False) == np.asarray(zp).tobytes()


@pytest.mark.parametrize("symmetric", [False, True])
def test_onnxruntime_kernel_gathers_the_dequantized_rows(tmp_path, symmetric):
    rows, dim, block = 50, 96, 32
    q = quantize_table(_table(rows, dim, seed=2), block, symmetric)
    kind = TensorProto.INT4 if symmetric else TensorProto.UINT4
    inits = [
        helper.make_tensor("E_Q4", kind, [rows, dim], _packed(q.data, symmetric), raw=True),
        numpy_helper.from_array(q.scales, "E_scales"),
    ]
    inputs = ["E_Q4", "ids", "E_scales"]
    if not symmetric:
        inits.append(helper.make_tensor("E_zp", TensorProto.UINT4, list(q.zero_points.shape),
                                        _packed(q.zero_points, False), raw=True))
        inputs.append("E_zp")
    node = helper.make_node("GatherBlockQuantized", inputs, ["y"], domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=block)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, dim])], inits,
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    ids = np.array([[0, 1, 2], [3, 4, 49]], dtype=np.int64)
    (y,) = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    np.testing.assert_array_equal(y, dequantize_table(q)[ids])
    # and the table is within half a step of the original per block
    step = np.repeat(np.abs(q.scales), block, axis=1)
    assert np.all(np.abs(dequantize_table(q) - _table(rows, dim, seed=2)) <= step * 0.5 + 1e-6
                  + (step if symmetric else 0))


def test_refusals():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_table(np.zeros((4, 40), np.float32), 32)
    with pytest.raises(ValueError, match="int4 only"):
        QuantOptions(bits=8, embeddings=True)


def _logits(path, ids):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, tiny_models.feed(session, ids))[0]


@pytest.mark.slow
def test_int4_export_with_quantized_embeddings(tmp_path):
    base = tiny_models.llama(tmp_path / "base", layers=2)  # untied head
    plain = export_onnx(base, tmp_path / "fp32.onnx")
    q = export_onnx(base, tmp_path / "q.onnx", dtype="int4", external_data=True,
                    quant=QuantOptions(embeddings=True))
    model = onnx.load(str(q.path))
    ops = [n.op_type for n in model.graph.node]
    names = {t.name for t in model.graph.initializer}
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    assert "model.embed_tokens.weight" not in names and "model.embed_tokens.weight_Q4" in names
    assert q.quantized_layers == 2 * 7 + 1  # every projection of both blocks, and the table
    ids = np.array([[5, 17, 33, 2, 71, 40, 9]], dtype=np.int64)
    assert cosine(_logits(q.path, ids), _logits(plain.path, ids)) >= 0.99
    export_onnx(base, tmp_path / "q0.onnx", dtype="int4", external_data=True)
    assert (tmp_path / "q.onnx.data").stat().st_size < (tmp_path / "q0.onnx.data").stat().st_size


@pytest.mark.slow
def test_a_tied_table_keeps_its_float_copy_for_the_head(tmp_path):
    base = tiny_families.qwen2(tmp_path / "base", layers=2)  # tied embeddings
    out = tmp_path / "q.onnx"
    run = run_cli("export", base, "-o", out, "--dtype", "int4", "--quantize-embeddings",
                  "--verify", "--json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert 0.95 <= report["cosine"] <= 1
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    names = {t.name for t in model.graph.initializer}
    assert "GatherBlockQuantized" in ops and "model.embed_tokens.weight" in names


def test_cli_refuses_embeddings_without_int4(tmp_path):
    base = tmp_path / "missing"
    run = run_cli("export", base, "-o", tmp_path / "x.onnx", "--quantize-embeddings")
    assert run.code == 2 and "--quantize-embeddings" in run.err and "int4" in run.err
    run = run_cli("export", base, "-o", tmp_path / "x.onnx", "--dtype", "int8",
                  "--quantize-embeddings")
    assert run.code == 2 and "int4 only" in run.err
