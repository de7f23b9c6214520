"""gpt-oss with MXFP4 experts (issue 24): published checkpoints store each stacked expert
parameter as ``X_blocks``/``X_scales`` (:mod:`loraformat.quant.mxfp4`).

A tiny gpt-oss is given MXFP4 experts of random codes and exponents (not made by loraformat's
quantizer); its float twin holds transformers' own dequantization of them. Then:

- loraformat dequantizes exactly as transformers' ``convert_moe_packed_tensors``, and reads the
  MXFP4 checkpoint as a base (``convert PEFT --base MXFP4_DIR``) as its float twin;
- ``merge MXFP4_DIR PEFT/`` (float output, quantization_config dropped) gives transformers the
  logits of PEFT's ``merge_and_unload`` on the dequantized model (1e-4 of the logits' scale);
- ``--requantize`` writes MXFP4 experts again: each merged value within half an MXFP4 step of
  PEFT's merged weight, and the survival report's figures are the ones computed here from
  transformers' dequantization of what was written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cli_harness import run_cli
from safetensors.numpy import load_file, save_file
from tiny_moe import logits, model, peft_adapter

from loraformat.quant import mxfp4

pytestmark = pytest.mark.slow
EXPERTS = ("gate_up_proj", "down_proj")


def _transformers_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                      dtype=torch.float32).numpy()


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """(MXFP4 checkpoint, its dequantized float twin, PEFT adapter, PEFT-merged model)."""
    root = tmp_path_factory.mktemp("mxfp4")
    m = model("gpt_oss", intermediate_size=32)  # MXFP4 blocks: input axes multiples of 32
    rng = np.random.default_rng(7)
    packed = {}
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith(EXPERTS):
                continue
            experts, inputs, outputs = p.shape
            blocks = rng.integers(0, 256, (experts, outputs, inputs // 32, 16), dtype=np.uint8)
            scales = rng.integers(123, 126, (experts, outputs, inputs // 32), dtype=np.uint8)
            p.copy_(torch.from_numpy(_transformers_dequantize(blocks, scales)))
            packed[name] = (blocks, scales)
    m.save_pretrained(root / "float")
    shutil.copytree(root / "float", root / "mxfp4")
    tensors = load_file(root / "float" / "model.safetensors")
    for name, (blocks, scales) in packed.items():
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, root / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (root / "mxfp4" / "config.json").write_text(json.dumps(config))
    adapter, peft_model = peft_adapter("gpt_oss", root / "float", root / "peft")
    merged = peft_model.merge_and_unload()
    return root / "mxfp4", root / "float", adapter, merged


def test_dequantizes_as_transformers(made):
    mxfp4_dir, float_dir, _, _ = made
    tensors = load_file(mxfp4_dir / "model.safetensors")
    reference = load_file(float_dir / "model.safetensors")
    stems = sorted(n.removesuffix("_blocks") for n in tensors if n.endswith("_blocks"))
    assert len(stems) == 4
    for stem in stems:
        ours = mxfp4.dequantize(tensors[stem + "_blocks"], tensors[stem + "_scales"])
        np.testing.assert_array_equal(ours, reference[stem], err_msg=stem)
        # requantizing the dequantized values stores the same values
        np.testing.assert_array_equal(mxfp4.dequantize(*mxfp4.quantize(ours)), ours)


def test_mxfp4_checkpoint_is_a_base_like_its_float_twin(made, tmp_path):
    mxfp4_dir, float_dir, adapter, _ = made
    for base in (mxfp4_dir, float_dir):
        result = run_cli("convert", adapter, "--base", base, "-o", tmp_path / base.name)
        assert result.code == 0, result.err
    ours, twin = (load_file(tmp_path / d / "adapter.safetensors") for d in ("mxfp4", "float"))
    assert sorted(ours) == sorted(twin) and any("experts" in n for n in ours)
    for name, value in twin.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_quantize_rounds_to_nearest_within_half_a_step():
    values = np.random.default_rng(0).normal(size=(2, 64, 8)).astype(np.float32)
    blocks, scales = mxfp4.quantize(values)
    assert blocks.shape == (2, 8, 2, 16) and scales.shape == (2, 8, 2)
    back = _transformers_dequantize(blocks, scales)
    rows = np.swapaxes(values, 1, 2).reshape(2, 8, 2, 32)
    step = np.ldexp(1.0, scales.astype(np.int32) - 127)[..., None]  # the widest gap: 4 → 6
    error = np.abs(np.swapaxes(back, 1, 2).reshape(2, 8, 2, 32) - rows)
    assert (error <= step + 1e-7).all()
    assert (np.abs(rows) <= 6 * step).all()  # nothing clipped


def test_merge_writes_float_checkpoint_equal_to_peft(made, tmp_path):
    mxfp4_dir, _, adapter, merged = made
    out = tmp_path / "out"
    result = run_cli("merge", mxfp4_dir, adapter, "-o", out)
    assert result.code == 0, result.err
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    written = load_file(out / "model.safetensors")
    assert not any(n.endswith(("_blocks", "_scales")) for n in written)
    ids = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 23, 7]])
    expected = logits(merged, ids)
    scale = float(expected.abs().max())
    assert (logits(out, ids) - expected).abs().max() <= 1e-4 * scale
    base = logits(made[1], ids)
    assert (base - expected).abs().max() > 0.2 * scale  # the adapter matters


def test_requantize_keeps_mxfp4_and_reports_survival(made, tmp_path):
    mxfp4_dir, float_dir, adapter, merged = made
    out = tmp_path / "out"
    result = run_cli("merge", mxfp4_dir, adapter, "-o", out, "--requantize", "--json")
    assert result.code == 0, result.err
    report = {layer["tensor"]: layer for layer in json.loads(result.out)["survival"]["layers"]}
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "quant_method"] == "mxfp4"
    written = load_file(out / "model.safetensors")
    before = load_file(float_dir / "model.safetensors")
    state = merged.state_dict()
    assert sorted(report) == sorted(n for n in before if n.endswith(EXPERTS))
    for stem, figures in report.items():
        blocks, scales = written[stem + "_blocks"], written[stem + "_scales"]
        stored = _transformers_dequantize(blocks, scales)
        want = state[stem].numpy()
        step = np.ldexp(1.0, scales.astype(np.int32) - 127)  # per block of a row
        error = np.abs(np.swapaxes(stored - want, -1, -2)).reshape(*scales.shape, 32)
        assert (error <= step[..., None] + 1e-6).all(), stem
        delta = want - before[stem]
        share = float(np.sum((stored - before[stem]) * delta) / np.sum(delta * delta))
        assert figures["type"] == "MXFP4"
        assert figures["share"] == pytest.approx(min(share, 1.0), abs=1e-3), stem
        assert figures["delta_norm"] == pytest.approx(float(np.linalg.norm(delta)), rel=1e-4)
    # attention was merged in float, as in the float output
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(written[name], state[name].numpy(), atol=1e-5, rtol=0)


def test_bf16_base_writes_bf16_experts(made, tmp_path):
    """A bf16 checkpoint (as gpt-oss is published): dequantized experts are written in bf16."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    mxfp4_dir, _, adapter, merged = made
    base = tmp_path / "bf16"
    shutil.copytree(mxfp4_dir, base)
    tensors = {k: v if v.dtype == torch.uint8 else v.to(torch.bfloat16)
               for k, v in load_torch(base / "model.safetensors").items()}
    save_torch(tensors, base / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    written = load_torch(tmp_path / "out" / "model.safetensors")
    state = merged.state_dict()
    for stem in (n for n in state if n.endswith(EXPERTS)):
        assert written[stem].dtype == torch.bfloat16, stem
        want = state[stem]
        # MXFP4 values are exact in bf16: only the merged sum is rounded (half a bf16 step)
        torch.testing.assert_close(written[stem].float(), want, rtol=2**-8, atol=1e-7)
