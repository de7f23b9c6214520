"""Greedy generation from the exported merged decoders (KV cache, ONNX Runtime) against
transformers' ``generate(do_sample=False)`` on PEFT's merge of the same adapter, token for token;
the fused (optimized) graph gives the same tokens; the generate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_models
import torch
from click.testing import CliRunner

from loraformat.cli import cli
from loraformat.errors import LoraformatError
from loraformat.export.decoder import export_decoder
from loraformat.export.optimize import optimize_file
from loraformat.generate import DecoderSession, greedy_generate
from loraformat.interchange import open_adapter

pytestmark = pytest.mark.slow

N_NEW = 32
PROMPT = [5, 17, 33, 2, 71, 40, 9]
# Adapters on every dense layer, scaled so the tiny random models produce varied tokens (a model
# that repeats one token would hide a broken KV cache); checked by test_reference_is_varied.
ADAPTERS = {
    "gpt2": {"target_modules": ["c_attn", "c_proj", "c_fc"], "lora_alpha": 64},
    "llama": {
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"],
        "lora_alpha": 8,
    },
}


def reference_generate(model, prompt: list[list[int]], n: int = N_NEW) -> list[list[int]]:
    ids = torch.tensor(prompt)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
            eos_token_id=None, pad_token_id=0,  # tiny configs name an eos: run all n steps
        )
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
    """(architecture, plain with-past export of the merged model, fused export, PEFT-merged
    transformers model). One torch export per architecture; the fused graph is derived from it."""
    from peft import PeftModel

    arch = request.param
    root = tmp_path_factory.mktemp(f"gen-{arch}")
    base = tiny_models.BUILDERS[arch](root / "base")
    adapter = tiny_models.peft_adapter(base, arch, root / "adapter", **ADAPTERS[arch])
    with open_adapter(adapter, base=base) as peft:  # PEFT becomes an adapter at the boundary
        result = export_decoder(base, root / "model.onnx", adapters=[peft], verify_output=True)
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance

    fused_path = root / "fused.onnx"
    report = optimize_file(result.path, fused_path, base)

    merged = PeftModel.from_pretrained(tiny_models.load_transformers(base, arch), adapter)
    merged = merged.merge_and_unload().eval()
    return arch, result.path, fused_path, merged, report


def test_reference_is_varied(exported):
    """The comparison means something: the reference uses many different tokens."""
    _, _, _, merged, _ = exported
    tokens = reference_generate(merged, [PROMPT])[0]
    assert len(set(tokens)) >= 8, tokens


def test_greedy_32_tokens_equal_transformers(exported):
    _, path, _, merged, _ = exported
    expected = reference_generate(merged, [PROMPT])
    result = greedy_generate(path, PROMPT, N_NEW)
    assert result.new_ids == expected
    assert result.ids == [PROMPT + expected[0]]
    assert len(result.decode_s) == N_NEW - 1  # one prefill, then one call per further token


def test_fused_graph_gives_the_same_tokens(exported):
    arch, _, fused_path, merged, report = exported
    expected = reference_generate(merged, [PROMPT])
    assert greedy_generate(fused_path, PROMPT, N_NEW).new_ids == expected
    # The fusions really fired (so this compared a different graph), per architecture.
    ops = {n.op_type for n in onnx.load(fused_path).graph.node}
    layers = merged.config.num_hidden_layers
    if arch == "gpt2":
        assert report.fusions["SkipLayerNormalization"] == 2 * layers + 1
        assert report.fusions["FastGelu"] == layers
        assert "LayerNormalization" not in ops
    else:
        assert report.fusions["SkipSimplifiedLayerNormalization"] == 2 * layers
        assert report.fusions["SimplifiedLayerNormalization"] == 1
        assert "Pow" not in ops and "ReduceMean" not in ops  # RMSNorm fused everywhere
    # Attention fuses in every layer (additive mask, cache concatenated on axis -2) and the
    # graph keeps its attention_mask input, so padding still counts.
    assert report.fusions["MultiHeadAttention"] == layers
    assert "Softmax" not in ops
    assert "attention_mask" in {i.name for i in onnx.load(fused_path).graph.input}
    assert report.nodes_after < report.nodes_before


def test_fused_attention_respects_padding(exported):
    """A left-padded batch through the fused graph equals the plain graph, prefill and decode."""
    _, plain_path, fused_path, _, _ = exported
    plain, fused = ort.InferenceSession(str(plain_path)), ort.InferenceSession(str(fused_path))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 96, (2, 6)).astype(np.int64)
    mask = np.ones((2, 6), np.int64)
    mask[0, :3] = 0
    feed = {"input_ids": ids, "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None)}
    for i in fused.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
    names = [o.name for o in fused.get_outputs()]
    got, want = fused.run(None, feed), plain.run(None, feed)
    for name, a, b in zip(names, got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
    step = {
        "input_ids": ids[:, :1],
        "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
        "position_ids": feed["position_ids"][:, -1:] + 1,
    }
    step.update({n.replace("present", "past_key_values"): v
                 for n, v in zip(names, got, strict=True) if n.startswith("present")})
    for name, a, b in zip(names, fused.run(None, step), plain.run(None, step), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)


def test_fused_logits_match_plain(exported):
    """The fused graph's prefill and decode outputs equal the unfused graph's (fp32)."""
    _, path, fused_path, _, _ = exported
    plain, fused = DecoderSession(path), DecoderSession(fused_path)
    ids = np.array([PROMPT, PROMPT[::-1]])
    a, past_a = plain.step(ids, plain.empty_past(2), 0)
    b, past_b = fused.step(ids, fused.empty_past(2), 0)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    a, past_a = plain.step(ids[:, :1], past_a, len(PROMPT))
    b, past_b = fused.step(ids[:, :1], past_b, len(PROMPT))
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for name in plain.past_names:
        np.testing.assert_allclose(past_a[name].numpy(), past_b[name].numpy(), atol=1e-4, rtol=0)


def test_batch_of_prompts_equals_transformers(exported):
    _, path, _, merged, _ = exported
    prompts = [PROMPT, [60, 3, 3, 81, 14, 7, 50]]
    assert greedy_generate(path, prompts, 12).new_ids == reference_generate(merged, prompts, 12)


def test_a_broken_cache_would_be_caught(exported):
    """Negative control: decoding with the KV cache zeroed after the prefill gives other tokens,
    so the equality above depends on the cache being fed back correctly."""
    _, path, _, merged, _ = exported
    session = DecoderSession(path)
    logits, past = session.step(np.array([PROMPT]), session.empty_past(1), 0)
    tokens = []
    for n in range(N_NEW):
        token = int(logits.argmax(-1)[0])
        tokens.append(token)
        zeros = {k: np.zeros_like(v.numpy()) for k, v in past.items()}
        logits, past = session.step(np.array([[token]]), zeros, len(PROMPT) + n)
    assert tokens != reference_generate(merged, [PROMPT])[0]


def test_eos_stops_generation(exported):
    _, path, _, merged, _ = exported
    expected = reference_generate(merged, [PROMPT])[0]
    eos = expected[4]
    stop = expected.index(eos)
    result = greedy_generate(path, PROMPT, N_NEW, eos_token_id=eos)
    assert result.new_ids == [expected[: stop + 1]]


def test_generate_cli_json(exported):
    _, path, _, merged, _ = exported
    run = CliRunner().invoke(
        cli, ["generate", str(path), "--prompt-ids", ",".join(map(str, PROMPT)),
              "--max-new-tokens", "10", "--json"],
    )
    assert run.exit_code == 0, run.output
    report = json.loads(run.output)
    assert report["prompt_ids"] == PROMPT
    assert report["new_ids"] == reference_generate(merged, [PROMPT], 10)[0]
    assert report["text"] is None  # no tokenizer.json next to the model
    assert report["prefill_ms"] > 0


def test_out_of_vocabulary_id_is_refused(exported):
    _, path, _, _, _ = exported
    with pytest.raises(LoraformatError, match=r"token id 96 is outside the vocabulary \(0\.\.95\)"):
        greedy_generate(path, [1, 96], 4)
    run = CliRunner().invoke(cli, ["generate", str(path), "--prompt-ids", "1,x"])
    assert run.exit_code == 2 and "comma-separated token ids" in run.output


def test_model_without_cache_is_refused(tmp_path: Path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [x], [y])
    path = tmp_path / "plain.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, path)
    with pytest.raises(LoraformatError) as err:
        DecoderSession(path)
    assert str(err.value) == (
        f"{path}: not a decoder exported with a KV cache (export with --with-past): missing "
        "input(s) attention_mask, position_ids, past_key_values.N.key/value"
    )
    with pytest.raises(LoraformatError, match="no such ONNX model"):
        DecoderSession(tmp_path / "missing.onnx")


def test_generate_cli_with_a_tokenizer(exported, tmp_path: Path):
    """Text in and out when a tokenizer.json is given (and `tokenizers` is installed)."""
    tokenizers = pytest.importorskip("tokenizers")
    _, path, _, _, _ = exported
    vocab = {f"t{i}": i for i in range(96)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    run = CliRunner().invoke(
        cli, ["generate", str(path), "--prompt", " ".join(f"t{i}" for i in PROMPT),
              "--tokenizer", str(tmp_path), "--max-new-tokens", "6", "--json"],
    )
    assert run.exit_code == 0, run.output
    report = json.loads(run.output)
    expected = greedy_generate(path, PROMPT, 6).new_ids[0]
    assert report["prompt_ids"] == PROMPT and report["new_ids"] == expected
    assert report["text"] == " ".join(f"t{i}" for i in expected)
    # --prompt without any tokenizer is a usage error naming the way out.
    run = CliRunner().invoke(cli, ["generate", str(path), "--prompt", "t1 t2"])
    assert run.exit_code == 2 and "--prompt needs a tokenizer" in run.output
