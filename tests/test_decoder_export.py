"""KV-cache decoder export through the CLI: `merge BASE ADAPTER -o m.onnx --with-past --optimize
--verify` and `export BASE --with-past --dtype float16 --optimize`; interface names, fusions,
verification figures, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import tiny_models
import torch
from cli_harness import run_cli

from loraformat.generate import DecoderSession, greedy_generate

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 33, 2, 71, 40, 9]


def interface(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def test_merge_with_past_optimize_verify_generates_like_peft(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    base = tiny_checkpoint("gpt2")
    adapter = tiny_models.peft_adapter(
        base, "gpt2", tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"],
        lora_alpha=64,
    )
    out = tmp_path / "merged.onnx"
    run = run_cli("merge", base, adapter, "-o", out, "--with-past", "--optimize", "--verify",
                 "--json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert report["max_abs_diff"] <= report["tolerance"] and report["tensors_changed"] == 8
    assert report["verify_provider"] == "CPUExecutionProvider"
    names_in, names_out = interface(2)
    graph = onnx.load(out)
    assert [i.name for i in graph.graph.input] == names_in
    assert [o.name for o in graph.graph.output] == names_out
    ops = {n.op_type for n in graph.graph.node}
    assert {"SkipLayerNormalization", "FastGelu"} <= ops and "LayerNormalization" not in ops
    # Weights keep their checkpoint names through the fusions.
    initializers = {t.name for t in graph.graph.initializer}
    assert "transformer.h.0.attn.c_attn.weight" in initializers
    assert "transformer.h.1.mlp.c_fc.weight" in initializers

    merged = PeftModel.from_pretrained(tiny_models.load_transformers(base, "gpt2"), adapter)
    merged = merged.merge_and_unload().eval()
    ids = torch.tensor([PROMPT])
    expected = merged.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=32, eos_token_id=None, pad_token_id=0)
    assert greedy_generate(out, PROMPT, 32).new_ids == [expected[0, len(PROMPT):].tolist()]

    # --optimize needs --with-past; --with-past needs an ONNX output from a checkpoint.
    run = run_cli("merge", base, adapter, "-o", tmp_path / "x.onnx", "--optimize")
    assert run.code == 2 and "--optimize applies only with --with-past" in run.err
    run = run_cli("merge", base, adapter, "-o", tmp_path / "dir", "--with-past")
    assert run.code == 2 and "--with-past exports a checkpoint BASE" in run.err
    # The output exists: refused without --overwrite, one line.
    run = run_cli("merge", base, adapter, "-o", out, "--with-past")
    assert run.code == 1
    assert run.error == f"error: {out}: output already exists (use --overwrite to replace it)"


def test_export_with_past_float16_optimized(tiny_checkpoint, tmp_path, monkeypatch):
    """fp16 for GPU providers: KV cache and weights fp16, logits fp32, fused; on CPU the graph
    is checked and, where ONNX Runtime has the fp16 kernels, run against fp32 torch."""
    base = tiny_checkpoint("llama")
    out = tmp_path / "llama16.onnx"
    monkeypatch.chdir(tmp_path)  # ORT's fp16 converter can leave temporaries in the cwd
    run = run_cli("export", base, "-o", out, "--with-past", "--dtype", "float16", "--optimize",
                 "--verify", "--json")
    assert run.code == 0, run.err
    # the model and its GenAI config (the base has no tokenizer), no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai_config.json", "llama16.onnx"]
    report = json.loads(run.out)
    assert report["dtype"] == "float16" and report["optimized"]
    assert report["fusions"]["SkipSimplifiedLayerNormalization"] == 4
    names_in, names_out = interface(2)
    assert report["inputs"] == names_in and report["outputs"] == names_out
    session = DecoderSession(out)
    assert set(session.past_dtypes.values()) == {np.float16}
    types = {o.name: o.type for o in session.session.get_outputs()}
    assert types["logits"] == "tensor(float)" and types["present.0.key"] == "tensor(float16)"
    graph = onnx.load(out)
    weight = next(t for t in graph.graph.initializer
                  if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert weight.data_type == onnx.TensorProto.FLOAT16
    if report["max_abs_diff"] is not None:
        assert report["max_abs_diff"] <= report["tolerance"]
    else:
        assert report["verify_provider"].startswith("not run")


def test_with_past_refused_for_an_encoder(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("bert")
    run = run_cli("export", base, "-o", tmp_path / "b.onnx", "--with-past")
    assert run.code == 1
    assert run.error == f"error: {base}: bert is an encoder: it has no KV cache to export"
    assert not (tmp_path / "b.onnx").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
