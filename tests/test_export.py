"""ONNX export and ONNX surgery, against real PEFT merges run in transformers.

One base export, one merged export and one plain ``torch.onnx.export`` of the transformers model
per architecture, shared by every test through module-scoped fixtures (exports are the slow part).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_models
import torch
from test_merge import (
    PEFT_CASES,
    make_peft_adapter,
    model_inputs,
    peft_merged_logits,
    run_cli,
)

from loraformat.checkpoint import Checkpoint
from loraformat.errors import LoraformatError
from loraformat.export.onnx import export_onnx
from loraformat.interchange import open_adapter
from loraformat.interchange.peft import read_peft
from loraformat.merge import merge_checkpoint
from loraformat.merge.onnx_surgery import merge_onnx

pytestmark = pytest.mark.slow
ARCHS = ["gpt2", "bert", "llama", "vit"]
ROOT = Path(__file__).resolve().parents[1]

#: Adapters for plain transformers exports: no replacements of all-zero tensors (the exporter's
#: optimizer drops or merges those, so such a graph has nothing to replace).
SURGERY_CASES = {
    "gpt2": dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "bert": dict(target_modules=["query", "value"], lora_bias=True),
    "llama": dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], use_dora=True),
    "vit": dict(target_modules=["q_proj", "v_proj", "fc2"]),
}


def ort_run(path: Path, arch: str) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in model_inputs(arch).items() if k in names}
    assert set(feed) == names, f"graph inputs {names}, fed {set(feed)}"
    return session.run(None, feed)[0]


def node_list(path: Path) -> list[tuple]:
    model = onnx.load(str(path), load_external_data=False)
    return [
        (n.op_type, n.domain, tuple(n.input), tuple(n.output),
         tuple(sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
        for n in model.graph.node
    ]


def initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """``exported(arch)`` → dict of paths and reference logits, built once per architecture."""
    cache: dict[str, dict] = {}

    def build(arch: str) -> dict:
        if arch in cache:
            return cache[arch]
        base = tiny_checkpoint(arch)
        root = tmp_path_factory.mktemp(f"export-{arch}")
        peft_dir = make_peft_adapter(base, arch, root / "peft", **PEFT_CASES[arch])
        native = read_peft(peft_dir, base=base).save(root / "adapter")
        if arch == "gpt2":  # the CLI path, once
            code, out = run_cli("export", base, "-o", root / "base.onnx", "--verify")
            assert code == 0 and "verify: max abs diff" in out, out
        else:
            export_onnx(base, root / "base.onnx")
        with open_adapter(peft_dir, base=base) as peft_adapter:  # PEFT → adapter at the boundary
            merged = export_onnx(
                base, root / "merged.onnx", adapters=[peft_adapter], verify_output=True
            )
        cache[arch] = {
            "base": base, "peft": peft_dir, "adapter": native, "root": root,
            "base_onnx": root / "base.onnx", "merged_onnx": root / "merged.onnx",
            "result": merged, "expected": peft_merged_logits(base, arch, peft_dir),
        }
        return cache[arch]

    return build


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_onnx_equals_peft_merge(exported, arch):
    case = exported(arch)
    got = ort_run(case["merged_onnx"], arch)
    np.testing.assert_allclose(got, case["expected"], atol=1e-4, rtol=0)
    assert np.abs(ort_run(case["base_onnx"], arch) - case["expected"]).max() > 1e-3
    result = case["result"]
    assert result.opset == 18 and result.dtype == "float32" and result.external_data is None
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_graph_has_exactly_the_base_nodes(exported, arch):
    case = exported(arch)
    assert node_list(case["merged_onnx"]) == node_list(case["base_onnx"])
    base, merged = initializers(case["base_onnx"]), initializers(case["merged_onnx"])
    assert base.keys() == merged.keys()
    changed = {n for n in base if not np.array_equal(base[n], merged[n])}
    assert changed and all(n in Checkpoint(case["base"]).shard_of for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_initializer_names_and_layouts_are_the_checkpoints(exported, arch):
    case = exported(arch)
    inits = initializers(case["base_onnx"])
    with Checkpoint(case["base"]) as ckpt:
        weights = [n for n in ckpt.names() if n.endswith(".weight")]
        missing = [n for n in weights if n not in inits]
        assert not missing, missing
        for name in weights:
            np.testing.assert_array_equal(inits[name], ckpt.numpy(name))
    assert not [n for n in inits if n.endswith(".weight") and n.startswith("val_")]


@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_on_our_export_equals_the_merged_export(exported, arch, tmp_path):
    case = exported(arch)
    result = merge_onnx(case["base_onnx"], [case["adapter"]], tmp_path / "s.onnx")
    assert result.tensors_changed == case["result"].tensors_changed and not result.unshared
    assert node_list(tmp_path / "s.onnx") == node_list(case["base_onnx"])
    np.testing.assert_allclose(
        ort_run(tmp_path / "s.onnx", arch), ort_run(case["merged_onnx"], arch), atol=1e-5, rtol=0
    )


@pytest.fixture(scope="module")
def plain(exported):
    """``plain(arch)`` → (plain torch.onnx.export of the transformers base (default optimizer),
    a PEFT adapter for it, PEFT-merged logits)."""
    cache: dict[str, tuple] = {}

    def build(arch: str):
        if arch not in cache:
            case = exported(arch)
            root = case["root"]
            model = tiny_models.load_transformers(case["base"], arch)
            kwargs = dict(model_inputs(arch))
            if arch in ("gpt2", "llama"):
                kwargs["use_cache"] = False  # transformers 5 GPT-2 does not export with a cache
            with torch.no_grad():
                program = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, verbose=False)
            program.save(str(root / "plain.onnx"))
            peft_dir = make_peft_adapter(case["base"], arch, root / "peft-s", seed=9,
                                         **SURGERY_CASES[arch])
            cache[arch] = (root / "plain.onnx", peft_dir,
                           peft_merged_logits(case["base"], arch, peft_dir))
        return cache[arch]

    return build


@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_on_a_plain_transformers_export(plain, arch, tmp_path):
    path, peft_dir, expected = plain(arch)
    assert any(i.name.startswith("val_") for i in onnx.load(str(path)).graph.initializer)
    args = {"unshare": True} if arch == "bert" else {}
    with open_adapter(peft_dir) as adapter:  # PEFT becomes an adapter at the boundary
        result = merge_onnx(path, [adapter], tmp_path / "s.onnx", **args)
    assert node_list(tmp_path / "s.onnx")[: len(node_list(path))] == node_list(path) or args
    np.testing.assert_allclose(ort_run(tmp_path / "s.onnx", arch), expected, atol=1e-4, rtol=0)
    assert result.layers > 0


def test_surgery_refuses_a_shared_bias_unless_unshared(plain, tmp_path):
    """The exporter merged BERT's identical (zero) biases into one initializer."""
    path, peft_dir, _ = plain("bert")
    code, message = run_cli("merge", path, peft_dir, "-o", tmp_path / "s.onnx")
    assert code == 1
    assert "its bias" in message and "is shared by" in message and "--unshare" in message
    assert not (tmp_path / "s.onnx").exists()
    code, out = run_cli("merge", path, peft_dir, "-o", tmp_path / "s.onnx", "--unshare")
    assert code == 0, out
    nodes = onnx.load(str(tmp_path / "s.onnx")).graph.node
    assert [n.op_type for n in nodes] == [n.op_type for n in onnx.load(str(path)).graph.node]


def test_surgery_unmerge_restores_the_base_initializers(exported, tmp_path):
    case = exported("llama")
    code, out = run_cli("unmerge", case["merged_onnx"], case["adapter"], "-o", tmp_path / "u.onnx")
    assert code == 1 and "DoRA" in out  # LLaMA's case is DoRA: not undoable
    case = exported("gpt2")
    code, out = run_cli("unmerge", case["merged_onnx"], case["adapter"], "-o", tmp_path / "u.onnx")
    assert code == 0, out
    base, back = initializers(case["base_onnx"]), initializers(tmp_path / "u.onnx")
    for name in base:
        np.testing.assert_allclose(back[name], base[name], atol=1e-5, rtol=0)


def test_surgery_refusals(exported, tmp_path):
    case = exported("gpt2")
    other = exported("llama")
    with pytest.raises(LoraformatError, match="adapter is for architecture 'llama'"):
        merge_onnx(case["base_onnx"], [other["adapter"]], tmp_path / "x.onnx")
    with pytest.raises(LoraformatError, match=r"must end in \.onnx"):
        merge_onnx(case["base_onnx"], [case["adapter"]], tmp_path / "x.bin")
    with pytest.raises(LoraformatError, match="output already exists"):
        merge_onnx(case["base_onnx"], [case["adapter"]], case["merged_onnx"])


def test_external_data_export_and_surgery(exported, tmp_path):
    case = exported("gpt2")
    result = export_onnx(case["base"], tmp_path / "ext.onnx", external_data=True)
    assert result.external_data == tmp_path / "ext.onnx.data" and result.external_data.is_file()
    assert (tmp_path / "ext.onnx").stat().st_size < result.external_data.stat().st_size
    np.testing.assert_allclose(ort_run(tmp_path / "ext.onnx", "gpt2"),
                               ort_run(case["base_onnx"], "gpt2"), atol=1e-6, rtol=0)
    merged = merge_onnx(tmp_path / "ext.onnx", [case["adapter"]], tmp_path / "m.onnx")
    assert merged.external_data == tmp_path / "m.onnx.data"
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", "gpt2"), case["expected"], atol=1e-4)
    # replacing it never rewrites the data file the old model still points at: names alternate
    again = merge_onnx(tmp_path / "ext.onnx", [case["adapter"]], tmp_path / "m.onnx",
                       overwrite=True)
    assert again.external_data == tmp_path / "m.onnx.1.data"
    assert not (tmp_path / "m.onnx.data").exists()
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", "gpt2"), case["expected"], atol=1e-4)
    assert not list(tmp_path.glob(".lf-tmp-*"))


def test_float16_export_verifies(exported, tmp_path):
    case = exported("llama")
    result = export_onnx(case["base"], tmp_path / "h.onnx", adapters=[case["adapter"]],
                         dtype="float16", verify_output=True)
    assert result.max_abs_diff <= result.tolerance
    types = {i.data_type for i in onnx.load(str(tmp_path / "h.onnx")).graph.initializer
             if i.name.endswith(".weight")}
    assert types == {onnx.TensorProto.FLOAT16}


def test_demo_example_merges_and_matches_transformers(tmp_path):
    """The README's main-job command: build the example, merge to ONNX with --verify."""
    build = subprocess.run([sys.executable, str(ROOT / "tools" / "build_example.py"),
                            str(tmp_path / "example")], capture_output=True, text=True, check=True)
    assert "adapter" in build.stdout
    base, adapter = tmp_path / "example" / "base", tmp_path / "example" / "adapter"
    code, out = run_cli("merge", base, adapter, "-o", tmp_path / "model.onnx", "--verify",
                        "--overwrite")
    assert code == 0, out
    assert "verify: max abs diff" in out and ": ok" in out
    # the example base is a real GPT-2 checkpoint, and the ONNX model is the merged one
    merge_checkpoint(base, [adapter], tmp_path / "merged")
    model = tiny_models.load_transformers(tmp_path / "merged", "gpt2")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, tiny_models.feed(session, ids))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_verify_feeds_dotted_graph_input_names(tiny_checkpoint, tmp_path):
    """With a KV cache the graph's input names (past_key_values.0.key) are not Python keywords
    (past_key_values_0_key); --verify must feed each input under its graph name."""
    from loraformat.architecture import ExportOptions

    result = export_onnx(
        tiny_checkpoint("gpt2"), tmp_path / "past.onnx",
        options=ExportOptions(with_past=True), verify_output=True,
    )
    assert "past_key_values.0.key" in result.input_names
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
