"""``--dtype bfloat16`` ONNX export: bf16 initializers bit for bit torch's cast, the fp16 export's
graph with bf16 types, outputs checked against transformers + peft in bf16, and ``--verify`` where
ONNX Runtime's CPU provider has no bf16 kernels (onnx's reference evaluator instead)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import safetensors.torch
import tiny_families
import tiny_models
import torch
from cli_harness import run_cli
from onnx.reference import ReferenceEvaluator
from test_merge import PEFT_CASES, make_peft_adapter

from loraformat.architecture import ExportOptions
from loraformat.base import open_base
from loraformat.checkpoint import Checkpoint
from loraformat.errors import LoraformatError
from loraformat.export.decoder import export_decoder
from loraformat.export.onnx import compare, export_onnx, merged_tensors, open_plan, random_inputs
from loraformat.export.runner import REFERENCE_EVALUATOR, open_runner, providers_for
from loraformat.export.stream import merged_array
from loraformat.interchange import open_adapter

BF16 = np.dtype(ml_dtypes.bfloat16)
NO_CUDA = "CUDAExecutionProvider" not in providers_for("float32")


def _torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy()


def test_bf16_cast_is_torchs_round_to_nearest_even_bit_for_bit(tmp_path):
    """Every non-NaN fp32 bit pattern class (random bits: normals, subnormals, ±inf, ties) and
    fp16/f64 sources cast as torch's ``.to(torch.bfloat16)``; a bf16 source is copied as is."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    ties = np.array([0x3F808000, 0x3F818000, 0x00008000, 0x80018000, 0x7F7FFFFF, 0x7F800000,
                     0xFF800000, 0x00000001], dtype=np.uint32)  # halfway cases, overflow, inf
    fp32 = np.concatenate([bits, ties]).view(np.float32)
    fp32 = fp32[~np.isnan(fp32)]
    tensors = {
        "f32": torch.from_numpy(fp32.copy()),
        "f16": torch.randn(300, dtype=torch.float16) * 1000,
        "f64": torch.randn(300, dtype=torch.float64),
        "bf16": torch.randn(300).to(torch.bfloat16),
        "i64": torch.arange(5),
        "nan": torch.tensor([float("nan"), -float("nan"), 1.0]),
    }
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    ckpt = Checkpoint(path)
    for name in ("f32", "f16", "f64", "bf16"):
        got = merged_array(ckpt, name, None, BF16)
        assert got.dtype == BF16
        want = tensors[name].to(torch.bfloat16).view(torch.int16).numpy()
        assert np.array_equal(got.view(np.int16), want), name
    source = tensors["bf16"].view(torch.int16).numpy()
    assert np.array_equal(merged_array(ckpt, "bf16", None, BF16).view(np.int16), source)
    assert np.array_equal(merged_array(ckpt, "i64", None, np.dtype(np.int64)), np.arange(5))
    # NaN stays NaN (its payload is not kept: ml_dtypes writes the canonical quiet NaN)
    assert np.isnan(merged_array(ckpt, "nan", None, BF16).astype(np.float32)[:2]).all()


def test_reference_evaluator_failure_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("FusedThing", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    path = tmp_path / "fused.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]), str(path))
    with pytest.raises(LoraformatError) as info:
        open_runner(path, [REFERENCE_EVALUATOR])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "cannot run the graph" in message and "FusedThing" in message
    assert "bfloat16 only on CUDAExecutionProvider" in message


# -- tiny model exports ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama + PEFT adapter, exported in float16 and bfloat16 (no verify)."""
    work = tmp_path_factory.mktemp("bf16-llama")
    base = tiny_models.llama(work / "base")
    peft = make_peft_adapter(base, "llama", work / "peft", **PEFT_CASES["llama"])
    adapter = open_adapter(peft, base=base)
    paths = {"base": base, "peft": peft}
    for dtype in ("float16", "bfloat16"):
        paths[dtype] = work / f"{dtype}.onnx"
        export_onnx(base, paths[dtype], adapters=[adapter], dtype=dtype, external_data=True)
    return paths


def _nodes(model: onnx.ModelProto, cast_to: dict[int, int] | None = None) -> list[tuple]:
    cast_to = cast_to or {}
    out = []
    for n in model.graph.node:
        attrs = []
        for a in n.attribute:
            value = onnx.helper.get_attribute_value(a)
            if n.op_type == "Cast" and a.name == "to":
                value = cast_to.get(value, value)
            attrs.append((a.name, repr(value)))
        out.append((n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(sorted(attrs))))
    return out


@pytest.mark.slow
def test_bf16_initializers_are_torchs_cast_of_the_merged_weights(llama):
    base = llama["base"]
    model = onnx.load(str(llama["bfloat16"]))
    inits = {t.name: t for t in model.graph.initializer}
    with contextlib.ExitStack() as stack:
        opened = stack.enter_context(open_base(base))
        plan = open_plan(stack, opened, [open_adapter(llama["peft"], base=base)])
        merged = merged_tensors(opened, plan, "float32")  # the merge, in fp32 (torch tensors)
        changed = set(plan.ops)
    assert changed and set(merged) <= set(inits)
    for name, value in merged.items():
        tensor = inits[name]
        assert tensor.data_type == onnx.TensorProto.BFLOAT16, name
        got = onnx.numpy_helper.to_array(tensor)
        assert got.dtype == BF16 and got.shape == tuple(value.shape), name
        want = value.to(torch.bfloat16).view(torch.int16).numpy()
        assert np.array_equal(got.view(np.int16), want), name


@pytest.mark.slow
def test_bf16_graph_is_the_fp16_graph_with_bf16_types(llama):
    fp16, bf16 = (onnx.load(str(llama[d]), load_external_data=False)
                  for d in ("float16", "bfloat16"))
    f16, b16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    assert _nodes(bf16) != _nodes(fp16)  # the Casts to the compute dtype differ ...
    assert _nodes(bf16) == _nodes(fp16, {f16: b16})  # ... and nothing else
    assert [t.name for t in bf16.graph.initializer] == [t.name for t in fp16.graph.initializer]
    for a, b in zip(fp16.graph.initializer, bf16.graph.initializer, strict=True):
        assert b.data_type == (b16 if a.data_type == f16 else a.data_type), a.name
    logits = bf16.graph.output[0].type.tensor_type.elem_type
    assert logits == b16


@pytest.mark.slow
def test_bf16_outputs_match_transformers_peft_in_bf16(llama):
    """The written file run by onnx's reference evaluator against an independent bf16 model:
    transformers + peft's ``merge_and_unload`` cast to bfloat16."""
    from peft import PeftModel

    hf = tiny_models.load_transformers(llama["base"], "llama")
    hf = PeftModel.from_pretrained(hf, str(llama["peft"])).merge_and_unload()
    hf = hf.to(torch.bfloat16).eval()
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits.float().numpy()
    evaluator = ReferenceEvaluator(onnx.load(str(llama["bfloat16"])))
    got = evaluator.run(None, tiny_models.feed(evaluator, ids))[0]
    assert got.dtype == BF16
    got = got.astype(np.float32)
    scale = float(np.abs(want).max())
    # bf16 rounds to 8 significant bits; two evaluation orders of the same bf16 graph differ by a
    # few units of the last place on the logits, not by the adapter's effect
    assert np.abs(got - want).max() <= 0.05 * max(1.0, scale)
    cos = float(got.ravel() @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos > 0.999
    base_hf = tiny_models.load_transformers(llama["base"], "llama").to(torch.bfloat16).eval()
    with torch.no_grad():
        unmerged = base_hf(input_ids=ids).logits.float().numpy()
    assert np.abs(unmerged - want).max() > 5 * np.abs(got - want).max()  # the check can tell


@pytest.mark.slow
def test_bf16_verify_runs_where_ort_cpu_cannot(llama, tmp_path):
    base = llama["base"]
    adapter = open_adapter(llama["peft"], base=base)
    r = export_onnx(base, tmp_path / "v.onnx", adapters=[adapter], dtype="bfloat16",
                    verify_output=True)
    want = REFERENCE_EVALUATOR if NO_CUDA else "CUDAExecutionProvider"
    assert r.verify_provider == want and r.dtype == "bfloat16"
    assert 0 < r.max_abs_diff <= r.tolerance and r.cosine > 0.999
    if NO_CUDA:  # the reason it is needed: ONNX Runtime's CPU provider has no bf16 kernels
        import onnxruntime

        with pytest.raises(Exception, match=r"NOT_IMPLEMENTED|not implemented|implementation"):
            onnxruntime.InferenceSession(str(tmp_path / "v.onnx"),
                                         providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_bf16_reference_check_tells_a_wrong_model_apart(llama, tmp_path):
    """The reference-evaluator check can fail: the export with the adapter, compared against the
    base's module (no adapter), exceeds the tolerance."""
    base = llama["base"]
    with open_base(base) as model:
        tensors = merged_tensors(model, None, "bfloat16")
        exported = model.arch.export_model(model.info, tensors, ExportOptions())
        inputs = random_inputs(exported, model.config)
        same = compare(llama["bfloat16"], exported, inputs, [REFERENCE_EVALUATOR])
    assert same.provider == REFERENCE_EVALUATOR
    assert same.max_abs_diff > 0.08 * max(1.0, same.scale)


@pytest.mark.slow
def test_bf16_source_checkpoint_is_copied_unchanged(tmp_path):
    fp32 = tiny_families.qwen2(tmp_path / "fp32")
    src = tmp_path / "bf16"
    src.mkdir()
    config = json.loads((fp32 / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(config))
    tensors = {k: v.to(torch.bfloat16)
               for k, v in safetensors.torch.load_file(str(fp32 / "model.safetensors")).items()}
    safetensors.torch.save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m.onnx"
    export_onnx(src, out, dtype="bfloat16")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for name, value in tensors.items():
        assert np.array_equal(inits[name].view(np.int16), value.view(torch.int16).numpy()), name
    shutil.rmtree(fp32)


@pytest.mark.slow
def test_bf16_kv_cache_decoder_verifies(tmp_path):
    base = tiny_families.qwen2(tmp_path / "base")
    r = export_decoder(base, tmp_path / "kv.onnx", dtype="bfloat16", verify_output=True)
    assert r.verify_provider == (REFERENCE_EVALUATOR if NO_CUDA else "CUDAExecutionProvider")
    assert r.max_abs_diff <= r.tolerance
    runner = open_runner(tmp_path / "kv.onnx", providers_for("bfloat16"))
    past = [n for n in runner.inputs if n.startswith("past_key_values")]
    assert past and all(runner.inputs[n] == BF16 for n in past)
    with pytest.raises(LoraformatError, match="--optimize exports float32, float16 or int4/int8"):
        export_decoder(base, tmp_path / "o.onnx", dtype="bfloat16", optimize=True)
    # generation runs ONNX Runtime's CPU provider, which has no bf16 kernels: one line, no trace
    run = run_cli("generate", tmp_path / "kv.onnx", "--prompt-ids", "1,2,3")
    assert run.code == 1 and "NOT_IMPLEMENTED" in run.error, run.err
    assert "bfloat16 model runs on CUDAExecutionProvider only" in run.error
    assert len(run.err.strip().splitlines()) == 1


# -- CLI ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_merge_bfloat16_verify(llama, tmp_path):
    out = tmp_path / "m.onnx"
    run = run_cli("merge", llama["base"], llama["peft"], "-o", out, "--dtype", "bfloat16",
                  "--verify", "--json")
    assert run.code == 0, run.err
    data = json.loads(run.out)
    onnx_part = data.get("onnx", data)
    assert onnx_part["dtype"] == "bfloat16"
    assert onnx_part["verify_provider"] == (REFERENCE_EVALUATOR if NO_CUDA
                                            else "CUDAExecutionProvider")
    types = {t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert onnx.TensorProto.BFLOAT16 in types and onnx.TensorProto.FLOAT16 not in types


@pytest.mark.slow
def test_cli_export_bfloat16_verify_names_the_evaluator(llama, tmp_path):
    run = run_cli("export", llama["base"], "-o", tmp_path / "e.onnx", "--dtype", "bfloat16",
                  "--verify")
    assert run.code == 0, run.err
    runner = REFERENCE_EVALUATOR if NO_CUDA else "ONNX Runtime (CUDAExecutionProvider)"
    assert f"between {runner} and torch on random inputs" in run.out
    assert ", bfloat16, " in run.out


def test_cli_help_lists_bfloat16():
    for command in ("export", "merge"):
        run = run_cli(command, "--help")
        assert run.code == 0 and "bfloat16" in run.out, command


@pytest.mark.slow
def test_cli_optimize_bfloat16_is_one_line(llama, tmp_path):
    run = run_cli("export", llama["base"], "-o", tmp_path / "x.onnx", "--with-past",
                  "--optimize", "--dtype", "bfloat16")
    assert run.code == 1
    assert run.error.startswith("error: ") and "not bfloat16" in run.error
