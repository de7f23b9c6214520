"""Expert LoRA for llama.cpp (issue 24): loraformat's GGUF adapter applied the way llama.cpp's
``build_lora_mm_id`` computes (per selected expert e: W[e]·x + alpha/r·B[e]·(A[e]·x)) to the base
converted by llama.cpp's own ``convert_hf_to_gguf.py`` gives the tensors that converter writes for
PEFT's merged model — every adapted tensor, attention (with Mixtral's q/k row permutation), router
and the stacked ``ffn_{gate,up,down}_exps`` (gpt-oss's gate/up de-interleaved). ``merge`` into that
GGUF base gives the same model.

Skipped unless ``LORAFORMAT_LLAMA_CPP_SRC`` names a llama.cpp source tree (its converter and
gguf-py; nothing is built). Running llama.cpp itself on these adapters is left to the llama.cpp
harness (issue 26).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from cli_harness import run_cli
from llama_cpp_convert import convert_hf_to_gguf
from tiny_moe import FAMILIES, checkpoint, peft_adapter

SRC = os.environ.get("LORAFORMAT_LLAMA_CPP_SRC")
if not SRC or not (Path(SRC) / "convert_hf_to_gguf.py").is_file():
    pytest.skip("LORAFORMAT_LLAMA_CPP_SRC (a llama.cpp source tree) not given",
                allow_module_level=True)
pytestmark = pytest.mark.slow

def convert(checkpoint_dir: Path, out: Path) -> dict[str, np.ndarray]:
    convert_hf_to_gguf(SRC, checkpoint_dir, out)
    return {t.name: np.array(t.data) for t in _reader(out).tensors}


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_expert_lora_gives_peft_merge(family, tmp_path):
    base = checkpoint(family, tmp_path / "base")
    adapter, peft_model = peft_adapter(family, base, tmp_path / "peft")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "config.json").write_text((base / "config.json").read_text())
    before = convert(base, tmp_path / "base.gguf")
    after = convert(tmp_path / "merged", tmp_path / "merged.gguf")

    result = run_cli("convert", adapter, "-o", tmp_path / "lora.gguf", "--base", base)
    assert result.code == 0, result.err
    reader = _reader(tmp_path / "lora.gguf")
    architecture = "general.architecture"
    assert reader.fields[architecture].contents() == \
        _reader(tmp_path / "base.gguf").fields[architecture].contents()
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    lora = {t.name: np.array(t.data) for t in reader.tensors}
    targets = sorted({name.rsplit(".", 1)[0] for name in lora})
    changed = sorted(n for n in before if not np.array_equal(before[n], after[n]))
    assert targets == changed  # exactly the tensors PEFT's merge changes, nothing else
    assert any("_exps" in n for n in targets)
    for name in targets:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        assert a.shape[:-2] == b.shape[:-2] == before[name].shape[:-2]  # experts first
        assert (a.shape[-1], b.shape[-2]) == (before[name].shape[-1], before[name].shape[-2])
        rank = b.shape[-1]  # llama.cpp: lw->b->ne[0]
        merged = before[name] + alpha / rank * np.matmul(b, a)
        scale = float(np.abs(after[name]).max())
        np.testing.assert_allclose(merged, after[name], rtol=0, atol=1e-5 * scale, err_msg=name)

    # and merged into the GGUF base (F32 here: the tensors are exact, no survival report)
    assert run_cli("convert", adapter, "-o", tmp_path / "lf", "--base", base).code == 0
    result = run_cli("merge", tmp_path / "base.gguf", tmp_path / "lf", "-o", tmp_path / "ours.gguf")
    assert result.code == 0, result.err
    ours = {t.name: np.array(t.data) for t in _reader(tmp_path / "ours.gguf").tensors}
    assert sorted(ours) == sorted(after)
    for name, value in after.items():
        scale = float(np.abs(value).max()) or 1.0
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=1e-5 * scale, err_msg=name)


def test_merge_into_quantized_experts_reports_survival(tmp_path):
    """--type Q8_0: the stacked expert tensors are requantized and measured like any other."""
    import json

    base = checkpoint("qwen3_moe", tmp_path / "base", moe_intermediate_size=32)  # Q8_0 blocks
    adapter, peft_model = peft_adapter("qwen3_moe", base, tmp_path / "peft")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "config.json").write_text((base / "config.json").read_text())
    convert(base, tmp_path / "base.gguf")
    after = convert(tmp_path / "merged", tmp_path / "merged.gguf")
    result = run_cli("merge", tmp_path / "base.gguf", adapter, "-o", tmp_path / "q8.gguf",
                     "--type", "Q8_0", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert "blk.0.ffn_gate_exps.weight" in json.dumps(report)
    from loraformat.quant import ggml

    for tensor in _reader(tmp_path / "q8.gguf").tensors:
        if not tensor.name.endswith("_exps.weight"):
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        assert tensor.tensor_type.name == "Q8_0"
        ours = ggml.dequantize(np.array(tensor.data), tensor.tensor_type, shape)
        expected = after[tensor.name]
        # Q8_0 steps: each 32-value block's max / 127 (float16 scale: just over half a step)
        step = np.abs(expected).reshape(-1, 32).max(axis=1) / 127
        error = np.abs(ours - expected).reshape(-1, 32).max(axis=1)
        assert (error <= step * 0.6 + 1e-6).all(), tensor.name
