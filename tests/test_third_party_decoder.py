"""A decoder family added from outside on the public decoder description: the Arcee plugin of
tests/third_party_plugin (``loraformat_toyarch.arcee``: LLaMA with a gate-less ReLU² MLP, one
replaced block) passes the conformance kit against transformers' ArceeForCausalLM, and merges,
exports its KV-cache decoder and generates like transformers on PEFT's merged model — with no
change to loraformat's core."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import tiny_families as tf
import torch
from cli_harness import run_cli

from loraformat.generate import greedy_generate

try:
    from loraformat_toyarch import arcee
except ImportError:  # the toy distribution is installed by `make setup`
    arcee = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(arcee is None, reason="install tests/third_party_plugin (make setup does)"),
]
PROMPT = [5, 17, 33, 2, 71, 40, 9, 11, 60, 3, 8]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def arcee_setup(tmp_path_factory):
    """A tiny Arcee checkpoint (YaRN rope, GQA, untied head) and a PEFT adapter on every
    projection."""
    import transformers as t
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("arcee")
    torch.manual_seed(0)
    config = t.ArceeConfig(
        num_hidden_layers=2, tie_word_embeddings=False, initializer_range=0.2,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 16},
        **tf.COMMON,
    )
    base = tf._save(t.ArceeForCausalLM(config), root / "base", 0)
    model = tf.load_transformers(base)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root, base, root / "adapter"


def peft_merged(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(tf.load_transformers(base), adapter).merge_and_unload()


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, loraformat_toyarch.arcee; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_conformance_kit_against_transformers(arcee_setup):
    from loraformat.testing import check_plugin

    _, base, _ = arcee_setup
    report = check_plugin(base, "arcee", reference=tf.load_transformers(base))
    assert report.plugin == "arcee"
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.foreign_names["gguf"]["model.layers.1.mlp.up_proj"] == "blk.1.ffn_up"
    assert sorted(report.permuted["gguf"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qk")
    assert not report.unused_layers


def test_merged_onnx_equals_peft_merge(arcee_setup):
    root, base, adapter = arcee_setup
    out = root / "merged.onnx"
    run = run_cli("merge", base, adapter, "-o", out, "--overwrite")
    assert run.code == 0, run.err
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref = peft_merged(base, adapter)(ids).logits.numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": ids.numpy(),
                                   "attention_mask": np.ones(ids.shape, np.int64)})[0]
    assert np.abs(got - ref).max() <= 1e-4 * float(np.abs(ref).max())


def test_kv_cache_decoder_is_traced_and_generates_like_transformers(arcee_setup):
    root, base, adapter = arcee_setup
    out = root / "decoder.onnx"
    run = run_cli("merge", base, adapter, "-o", out, "--with-past", "--verify", "--json",
                  "--overwrite", "--no-genai-config")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    # The emitter writes only the default blocks; the family's own MLP is traced from torch.
    assert report["graph"] == "traced (the arcee plugin builds the decoder from its own blocks)"
    assert report["max_abs_diff"] <= report["tolerance"]
    prompt = torch.tensor([PROMPT])
    expected = peft_merged(base, adapter).generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
        eos_token_id=None, pad_token_id=0)
    assert greedy_generate(out, PROMPT, 24).new_ids == [expected[0, len(PROMPT):].tolist()]


def test_gguf_adapter_has_llama_cpp_names(arcee_setup):
    import gguf

    root, base, adapter = arcee_setup
    out = root / "adapter.gguf"
    run = run_cli("convert", adapter, "--to", "gguf", "--base", base, "-o", out, "--overwrite")
    assert run.code == 0, run.err
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "arcee"
    names = {t.name for t in reader.tensors}
    expected = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for ab in "ab"
                for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")}
    assert names == expected
