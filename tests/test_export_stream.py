"""Streamed export: same file as an in-memory export; int4/int8 MatMulNBits output; CLI options.

The in-memory reference is built here from the pieces today's export was made of (every merged
tensor in memory, the plugin's module loaded with them, the same exporter), so the streamed path
is checked against an independent construction, not against itself.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tiny_models
from cli_harness import run_cli
from test_merge import PEFT_CASES, make_peft_adapter

from loraformat.architecture import ExportOptions
from loraformat.base import open_base
from loraformat.errors import LoraformatError
from loraformat.export.onnx import cosine, export_graph, export_onnx, merged_tensors, open_plan
from loraformat.export.quantize import QuantOptions
from loraformat.export.stream import weightless_parameters
from loraformat.interchange import open_adapter
from loraformat.quant.matmulnbits import dequantize, quantize

pytestmark = pytest.mark.slow
ARCHS = ["gpt2", "bert", "llama", "vit"]


def _nodes(model: onnx.ModelProto) -> list[tuple]:
    return [
        (n.op_type, n.domain, tuple(n.input), tuple(n.output),
         tuple(sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
        for n in model.graph.node
    ]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _in_memory_export(base: Path, adapters: list[Path]) -> onnx.ModelProto:
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(open_base(base))
        plan = open_plan(stack, model, adapters)
        tensors = merged_tensors(model, plan, "float32")
        exported = model.arch.export_model(model.info, tensors, ExportOptions())
        return ir.to_proto(export_graph(exported, set(tensors)))


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_export_equals_the_in_memory_export(tiny_checkpoint, tmp_path, arch):
    base = tiny_checkpoint(arch)
    # PEFT becomes a loraformat adapter at the boundary, as the CLI does
    adapter = open_adapter(make_peft_adapter(base, arch, tmp_path / "peft", **PEFT_CASES[arch]),
                           base=base)
    out = tmp_path / "streamed.onnx"
    # every layer traced, as the reference is: that repeating layers gives the same graph is
    # tests/test_export_repeat.py's (node for node, in canonical form)
    export_onnx(base, out, adapters=[adapter], external_data=True, repeat_layers=False)
    streamed = onnx.load(str(out))
    reference = _in_memory_export(base, [adapter])
    assert _nodes(streamed) == _nodes(reference)
    got, want = _inits(streamed), _inits(reference)
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    assert (tmp_path / "streamed.onnx.data").is_file()


def test_weightless_build_holds_no_parameter_memory():
    """What the plugin constructs under weightless_parameters() is on the meta device."""
    import torch

    with weightless_parameters():
        module = torch.nn.Linear(64, 64)
        kept = torch.nn.Parameter(torch.zeros(()).expand(8, 8))  # a placeholder stays
        holder = torch.nn.Module()
        holder.register_parameter("p", kept)
    assert module.weight.device.type == "meta" and holder.p.device.type == "cpu"
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"  # restored afterwards


def _llama_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, tiny_models.feed(session, ids))[0]


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory):
    base = tiny_models.llama(tmp_path_factory.mktemp("llama"), layers=2)
    root = tmp_path_factory.mktemp("int4")
    peft_dir = make_peft_adapter(base, "llama", root / "peft", **PEFT_CASES["llama"])
    adapter = open_adapter(peft_dir, base=base)
    fp32 = export_onnx(base, root / "fp32.onnx", adapters=[adapter])
    int4 = export_onnx(base, root / "int4.onnx", adapters=[adapter], dtype="int4",
                       verify_output=True)
    return {"base": base, "adapter": adapter, "peft": peft_dir, "root": root, "fp32": fp32,
            "int4": int4}


def test_int4_export_runs_close_to_fp32(llama_exports, tmp_path):
    ids = np.array([[5, 17, 33, 2, 71, 40, 9]], dtype=np.int64)
    base = llama_exports["base"]
    plain32 = export_onnx(base, tmp_path / "fp32.onnx")
    plain4 = export_onnx(base, tmp_path / "int4.onnx", dtype="int4")
    # The base model's logits on a prompt: int4 (block 32, asymmetric) vs fp32.
    assert cosine(_llama_logits(plain4.path, ids), _llama_logits(plain32.path, ids)) >= 0.99
    # Merged with a large random DoRA adapter the weights are harder to quantize (0.97 here).
    fp32, int4 = llama_exports["fp32"], llama_exports["int4"]
    a, b = _llama_logits(fp32.path, ids), _llama_logits(int4.path, ids)
    assert a.shape == b.shape and cosine(a, b) >= 0.95
    assert int4.cosine is not None and 0.95 <= int4.cosine < 1  # --verify: vs fp32 torch
    model = onnx.load(str(int4.path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 * 7  # every projection of both blocks; lm_head kept
    assert int4.quantized_layers == 14
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    names = {t.name for t in model.graph.initializer}
    assert "lm_head.weight" in names and "model.layers.0.self_attn.q_proj.weight" not in names


def test_int4_initializers_are_the_merged_weights_quantized(llama_exports):
    """The packed bytes are quantize(merged W); the merged W is PEFT's (the fp32 export's)."""
    fp32 = _inits(onnx.load(str(llama_exports["fp32"].path)))
    int4 = _inits(onnx.load(str(llama_exports["int4"].path)))
    name = "model.layers.1.mlp.down_proj.weight"
    q = quantize(fp32[name], bits=4, block_size=32)
    np.testing.assert_array_equal(int4[name + "_Q4"], q.packed)
    np.testing.assert_array_equal(int4[name + "_scales"], q.scales)
    np.testing.assert_array_equal(int4[name + "_zero_points"], q.zero_points)
    assert np.max(np.abs(dequantize(q) - fp32[name])) <= np.max(np.abs(q.scales))


def test_int8_symmetric_with_head(llama_exports, tmp_path):
    base, adapter = llama_exports["base"], llama_exports["adapter"]
    result = export_onnx(
        base, tmp_path / "int8.onnx", adapters=[adapter], dtype="int8",
        quant=QuantOptions(symmetric=True, block_size=16, accuracy_level=None, lm_head=True),
    )
    model = onnx.load(str(result.path))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 15  # + lm_head
    assert all(len(n.input) == 3 for n in nodes)  # symmetric: no zero points
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["bits"] == 8 and attrs["block_size"] == 16 and "accuracy_level" not in attrs
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    ref = _llama_logits(llama_exports["fp32"].path, ids)
    assert cosine(_llama_logits(result.path, ids), ref) >= 0.999


def test_cli_int4_decoder_with_past_optimized_generates(llama_exports, tmp_path):
    from loraformat.generate import greedy_generate

    out = tmp_path / "dec.onnx"
    run = run_cli("merge", llama_exports["base"], llama_exports["peft"], "-o", out,
                  "--with-past", "--optimize", "--dtype", "int4", "--block-size", "16",
                  "--symmetric", "--verify", "--json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert report["dtype"] == "int4" and report["quantized_layers"] == 14
    assert 0.9 <= report["cosine"] < 1  # int4 vs the fp32 torch module, prefill + decode
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and "SkipSimplifiedLayerNormalization" in ops
    # Same greedy tokens as the fp32 decoder on a short continuation is not guaranteed for a
    # random tiny model; the int4 decoder must run prefill + decode and agree with itself.
    first = greedy_generate(out, [5, 17, 33], 4).new_ids
    assert len(first[0]) == 4 and greedy_generate(out, [5, 17, 33], 4).new_ids == first


def test_quantization_option_refusals(llama_exports, tmp_path):
    base = llama_exports["base"]
    run = run_cli("export", base, "-o", tmp_path / "x.onnx", "--block-size", "32")
    assert run.code == 2 and "--block-size" in run.err and "int4" in run.err
    run = run_cli("export", base, "-o", tmp_path / "x.onnx", "--dtype", "int4",
                  "--block-size", "24")
    assert run.code == 2 and "power of two" in run.err
    with pytest.raises(LoraformatError, match="apply to --dtype int4/int8"):
        export_onnx(base, tmp_path / "y.onnx", quant=QuantOptions())
    with pytest.raises(LoraformatError, match="--dtype must be one of"):
        export_onnx(base, tmp_path / "y.onnx", dtype="int3")
    assert not list(tmp_path.iterdir())


def test_int4_conv1d_weights_are_quantized_as_their_transpose(tiny_checkpoint, tmp_path):
    """GPT-2's Conv1D stores [in, out]: MatMulNBits must hold quantize(Wᵀ) — the numpy reference
    on the checkpoint tensor, independent of the export's fast path."""
    from safetensors.numpy import load_file

    from loraformat.quant.matmulnbits import quantize_numpy

    base = tiny_checkpoint("gpt2")
    result = export_onnx(base, tmp_path / "g.onnx", dtype="int4", verify_output=True)
    assert result.quantized_layers > 0 and 0.9 <= result.cosine <= 1
    inits = _inits(onnx.load(str(result.path)))
    weights = load_file(str(base / "model.safetensors"))
    name = next(n for n in weights if n.endswith("h.0.attn.c_attn.weight"))
    ref = quantize_numpy(weights[name].T.astype(np.float32), bits=4, block_size=32)
    np.testing.assert_array_equal(inits[f"{name}_Q4"], ref.packed)
    np.testing.assert_array_equal(inits[f"{name}_scales"], ref.scales)
    np.testing.assert_array_equal(inits[f"{name}_zero_points"], ref.zero_points)
