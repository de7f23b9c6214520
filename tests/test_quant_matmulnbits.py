"""The MatMulNBits codec against ONNX Runtime's own quantizer (bit for bit) and kernel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from loraformat.quant.matmulnbits import check_params, dequantize, quantize, quantize_numpy

SHAPES = [(64, 256, 32), (33, 100, 16), (17, 96, 32), (40, 512, 128)]  # N, K, block (ragged K too)


def _weight(n: int, k: int, block: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[0, :block] = 0  # scale 0
    w[1, :block] = np.abs(w[1, :block])  # all positive: asymmetric min clamps to 0
    w[2, :block] = -np.abs(w[2, :block])  # all negative
    w[3, :4] = [0.5, -0.5, 1.5, -2.5]  # exact halves somewhere
    return w


def _ort_pybind(w: np.ndarray, bits: int, block: int, symmetric: bool):
    """What MatMulNBitsQuantizer computes: the C++ quantizer on B = Wᵀ [K, N], K zero-padded."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    k_blocks, pack = -(-k // block), 8 // bits
    b = np.pad(np.ascontiguousarray(w.T), ((0, k_blocks * block - k), (0, 0)))
    packed = np.zeros((n, k_blocks, block // pack), np.uint8)
    zp = np.zeros((n, -(-k_blocks // pack)), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, b, scales, zp, block, n, k_blocks * block, symmetric)
    return packed, scales, zp


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_exact_against_onnxruntime(bits: int, symmetric: bool, shape: tuple[int, int, int]):
    n, k, block = shape
    w = _weight(n, k, block)
    ours = quantize_numpy(w, bits=bits, block_size=block, symmetric=symmetric)
    packed, scales, zp = _ort_pybind(w, bits, block, symmetric)
    np.testing.assert_array_equal(ours.packed, packed)
    np.testing.assert_array_equal(ours.scales, scales)
    if symmetric:
        assert ours.zero_points is None
    else:
        np.testing.assert_array_equal(ours.zero_points, zp)
    # Dequantized error is bounded by half a step per block (the padding adds nothing).
    step = np.repeat(np.abs(ours.scales), block, axis=1)[:, :k]
    assert np.all(np.abs(dequantize(ours) - w) <= step * 0.5 + 1e-6 + (step if symmetric else 0))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_calls_onnxruntime_and_equals_the_numpy_reference(bits, symmetric, shape):
    n, k, block = shape
    w = _weight(n, k, block, seed=5)
    ref = quantize_numpy(w, bits=bits, block_size=block, symmetric=symmetric)
    for got in (quantize(w, bits=bits, block_size=block, symmetric=symmetric),
                quantize(np.ascontiguousarray(w.T), bits=bits, block_size=block,
                         symmetric=symmetric, weight_is_transposed=True)):
        np.testing.assert_array_equal(got.packed, ref.packed)
        np.testing.assert_array_equal(got.scales, ref.scales)
        assert (got.zero_points is None) == (ref.zero_points is None)
        if ref.zero_points is not None:
            np.testing.assert_array_equal(got.zero_points, ref.zero_points)
        assert got.k == ref.k == k


def test_without_onnxruntime_quantize_is_the_numpy_reference(monkeypatch):
    from loraformat.quant import matmulnbits

    monkeypatch.setattr(matmulnbits, "_onnxruntime_quantizer", lambda bits: None)
    w = _weight(33, 100, 16)
    got = matmulnbits.quantize(w, block_size=16)
    np.testing.assert_array_equal(got.packed, quantize_numpy(w, block_size=16).packed)


def test_matmulnbits_quantizer_model_and_kernel(tmp_path):
    """The public ORT quantizer on a one-MatMul model writes our bytes; ORT's kernel computes
    x · dequantize(q)ᵀ."""
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    n, k, block = 48, 160, 32
    w = _weight(n, k, block, seed=3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    quantizer = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False)
    quantizer.process()
    inits = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    ours = quantize(w, bits=4, block_size=block)
    np.testing.assert_array_equal(inits["B_Q4"], ours.packed)
    np.testing.assert_array_equal(inits["B_scales"].reshape(ours.scales.shape), ours.scales)
    np.testing.assert_array_equal(inits["B_zero_points"].reshape(-1), ours.zero_points.reshape(-1))

    path = tmp_path / "q.onnx"
    onnx.save(quantizer.model.model, path)
    x = np.random.default_rng(1).standard_normal((2, k)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ dequantize(ours).T, rtol=1e-4, atol=1e-4)


def test_refusals():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        check_params(3, 32)
    with pytest.raises(ValueError, match="power of two"):
        check_params(4, 24)
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros((2, 3, 4), np.float32))
