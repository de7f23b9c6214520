"""The emitted KV-cache decoder (loraformat/export/emitter.py), every built-in decoder family:
`merge BASE ADAPTER -o m.onnx --with-past` writes GroupQueryAttention/packed-projection graphs whose
logits equal transformers on PEFT's merged model (prefill and decode steps through the cache),
greedy generation equals transformers' generate, int4 keeps the cosine of ONNX Runtime's own
quantizer, and specs the emitter does not know fall back to the traced graph.

The tiny checkpoints have head sizes of 16 or more (GroupQueryAttention's CPU kernel needs a
multiple of 16; tests/tiny_families.py's head size 8 takes the traced path)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import tiny_families as tf
import torch
from cli_harness import run_cli

from loraformat.generate import greedy_generate

pytestmark = pytest.mark.slow

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
PROMPT = [5, 17, 33, 2, 71, 40, 9, 11, 60, 3, 8]


def build(family: str, out):
    """A tiny ``family`` checkpoint with GQA-sized heads and every feature the family uses:
    llama3 rope scaling, tied heads (Qwen2, Gemma), q/k norms and explicit head size (Qwen3,
    Gemma 3), 4-token windows on 11-token prompts (Mistral, Gemma), soft-caps (Gemma 2), two
    ropes (Gemma 3), partial rotary and LongRoPE crossing its 8-token switch (Phi-3)."""
    import transformers as t

    torch.manual_seed(0)
    common = dict(tf.COMMON, hidden_size=64, initializer_range=0.1)
    gemma = dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=4)
    if family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(
            num_hidden_layers=2, tie_word_embeddings=False, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **common))
    elif family == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(
            num_hidden_layers=2, tie_word_embeddings=True, **common))
    elif family == "qwen3":
        model = t.Qwen3ForCausalLM(t.Qwen3Config(
            num_hidden_layers=2, head_dim=32, tie_word_embeddings=False, **common))
    elif family == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(
            num_hidden_layers=2, sliding_window=4, tie_word_embeddings=False, **common))
    elif family == "gemma2":
        model = t.Gemma2ForCausalLM(t.Gemma2Config(
            num_hidden_layers=2, attn_logit_softcapping=0.05, final_logit_softcapping=2.0,
            **gemma, **common))
    elif family == "gemma3":
        model = t.Gemma3ForCausalLM(t.Gemma3TextConfig(
            num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            }, **gemma, **common))
    else:
        half = 32 // 2 // 2  # head 32, rotary 16 channels → 8 frequencies
        common.update(num_attention_heads=2, num_key_value_heads=1)
        model = t.Phi3ForCausalLM(t.Phi3Config(
            num_hidden_layers=2, original_max_position_embeddings=8, tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0 + 0.5 * i for i in range(half)],
                "long_factor": [3.0 + 2.0 * i for i in range(half)],
                "original_max_position_embeddings": 8,
            }, **common))
    return tf._save(model, out, 0)


@pytest.fixture(scope="module")
def family_setup(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            base = build(family, root / "base")
            # (LLaMA's projections are Qwen2's)
            adapter = tf.peft_adapter(base, family if family in tf.PROJECTIONS else "qwen2",
                                      root / "adapter", lora_alpha=16)
            made[family] = (root, base, adapter)
        return made[family]

    return get


def peft_merged(base, adapter):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tf.load_transformers(base), adapter)
    return model.merge_and_unload().eval()


def run_steps(path, ids: np.ndarray, split: int, past_dtype=np.float32) -> np.ndarray:
    """Logits of ``ids`` [batch, seq] run as a prefill of ``split`` tokens then one-token decode
    steps through the graph's KV cache, concatenated along the sequence."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    batch = ids.shape[0]
    past = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), past_dtype) for i in pasts}
    outs, start = [], 0
    for stop in [split, *range(split + 1, ids.shape[1] + 1)]:
        got = session.run(None, {
            "input_ids": ids[:, start:stop],
            "attention_mask": np.ones((batch, stop), np.int64),
            "position_ids": np.tile(np.arange(start, stop), (batch, 1)),
            **past,
        })
        outs.append(np.asarray(got[0], np.float32))
        past = {i.name: v for i, v in zip(pasts, got[1:], strict=True)}
        start = stop
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_emitted_decoder_equals_peft_merge_and_generates_like_transformers(family_setup, family):
    root, base, adapter = family_setup(family)
    out = root / "merged.onnx"
    run = run_cli("merge", base, adapter, "-o", out, "--with-past", "--verify", "--json",
                  "--overwrite")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert report["graph"] == "emitted"
    assert report["max_abs_diff"] <= report["tolerance"]  # against the torch module (--verify)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    # per layer: packed q/k/v, o, gate, up (Phi-3: its one gate_up_proj), down; the head (a
    # tied one: Gemm on the table)
    per_layer = 4 if family == "phi3" else 5
    assert ops.count("GroupQueryAttention") == 2
    assert ops.count("MatMul") + ops.count("Gemm") == 2 * per_layer + 1
    assert "Transpose" not in ops and "Softmax" not in ops

    merged = peft_merged(base, adapter)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref = merged(ids).logits.numpy()
    # 9-token prefill, 2 decode steps (Phi-3: the prefill is past LongRoPE's switch already, as
    # transformers' one forward over all 11 is)
    got = run_steps(out, ids.numpy(), 9)
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 1e-4 * scale

    prompt = torch.tensor([PROMPT])
    expected = merged.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    assert greedy_generate(out, PROMPT, 16).new_ids == [expected[0, len(PROMPT):].tolist()]


def logits_of(path, ids: np.ndarray) -> np.ndarray:
    return run_steps(path, ids, ids.shape[1])


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_cosine_at_least_onnxruntime_quantizer(family_setup, family):
    """int4 (block 16, its defaults otherwise) against fp32 transformers: at least the cosine
    of ONNX Runtime's MatMulNBitsQuantizer run on the emitted fp32 graph (same packed weights),
    within 1e-3. The heads are quantized alike: an untied MatMul head by both (the emitter's
    default), a tied head (a Gemm on the embedding table, which ORT's quantizer leaves float)
    by neither (--float-lm-head)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from safetensors import safe_open

    root, base, _ = family_setup(family)
    fp32, int4 = root / "f32.onnx", root / "int4.onnx"
    assert run_cli("export", base, "-o", fp32, "--with-past", "--overwrite").code == 0
    with safe_open(str(base / "model.safetensors"), "numpy") as f:
        tied = "lm_head.weight" not in set(f.keys())
    head = ["--float-lm-head"] if tied else []
    run = run_cli("export", base, "-o", int4, "--with-past", "--dtype", "int4", "--block-size",
                  "16", *head, "--verify", "--json", "--overwrite")
    assert run.code == 0, run.err
    assert json.loads(run.out)["graph"] == "emitted"
    ops = [n.op_type for n in onnx.load(int4).graph.node]
    assert ops.count("MatMulNBits") == 2 * (4 if family == "phi3" else 5) + (not head)

    quantizer = MatMulNBitsQuantizer(onnx.load(fp32), block_size=16, is_symmetric=False,
                                     accuracy_level=4)
    quantizer.process()
    theirs = root / "ort_int4.onnx"
    onnx.save(quantizer.model.model, theirs)

    ids = np.array([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref = tf.load_transformers(base)(torch.from_numpy(ids)).logits.numpy()
    ours_cos = cosine(logits_of(int4, ids), ref)
    theirs_cos = cosine(logits_of(theirs, ids), ref)
    assert ours_cos >= theirs_cos - 1e-3, (ours_cos, theirs_cos)
    assert ours_cos > 0.9


def test_float16_emitted_runs_on_cpu(family_setup):
    root, base, _ = family_setup("gemma3")
    out = root / "f16.onnx"
    run = run_cli("export", base, "-o", out, "--with-past", "--dtype", "float16", "--optimize",
                  "--verify", "--json", "--overwrite")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert report["graph"] == "emitted" and not report["optimized"]  # already fused
    assert report["max_abs_diff"] <= report["tolerance"]
    ids = np.array([PROMPT])
    with torch.no_grad():
        ref = tf.load_transformers(base)(torch.from_numpy(ids)).logits.numpy()
    assert cosine(run_steps(out, ids, 8, np.float16), ref) > 0.999


def test_emitted_merge_never_imports_torch(family_setup, tmp_path):
    """The emitted path reads the description (rope tables in numpy), the checkpoint and the
    adapter with numpy only: importing torch alone would cost more than a small model's write."""
    import subprocess
    import sys

    _, base, adapter = family_setup("gemma3")
    code = (
        "import sys\n"
        "from loraformat.cli import main\n"
        "try:\n"
        f"    main(['merge', {str(base)!r}, {str(adapter)!r}, '-o', {str(tmp_path / 'm.onnx')!r},"
        " '--with-past', '--no-genai-config'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_unknown_spec_feature_falls_back_to_the_traced_graph(family_setup, monkeypatch):
    """A description field the emitter does not know, set to a non-default value (a family
    added later), and a head size GroupQueryAttention cannot run, both take the traced path."""
    import loraformat_plugins.llama as llama_plugin

    from loraformat.export.emitter import unsupported

    root, base, _ = family_setup("llama")

    @dataclasses.dataclass(frozen=True)
    class Later(llama_plugin.DecoderSpec):
        post_norms: bool = False

    original = llama_plugin.Llama.spec

    def later_spec(self, checkpoint):
        spec = original(self, checkpoint)
        return Later(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)},
                     post_norms=True)

    spec = later_spec(llama_plugin.Llama(), _info(base))
    assert "post_norms" in unsupported(spec, {})
    assert unsupported(dataclasses.replace(spec, post_norms=False), {}) is None
    assert "head size 8" in unsupported(dataclasses.replace(spec, post_norms=False, head_dim=8), {})
    # Per-layer kinds, shapes and caches are written when they are what the rest implies.
    from loraformat.architecture.decoder import LINEAR, CacheTensor, LayerCache, kv_cache

    plain = dataclasses.replace(spec, post_norms=False)
    said = dataclasses.replace(plain, layer_kinds=("full_attention",) * 2,
                               caches=(kv_cache(plain.n_kv, plain.head_dim),) * 2)
    assert unsupported(said, {}) is None
    assert unsupported(dataclasses.replace(said, layer_kinds=(LINEAR, "full_attention")),
                       {}) == "layer 0 is 'linear_attention'"
    state = LayerCache((CacheTensor("conv_state", ("batch", 8, 3)),))
    assert unsupported(dataclasses.replace(said, caches=(state, said.caches[1])),
                       {}) == "layer 0 carries conv_state"
    wide = (plain.n_head, plain.n_kv, 2 * plain.head_dim)
    assert "own head shape" in unsupported(dataclasses.replace(said, layer_shapes=(None, wide)),
                                           {})

    monkeypatch.setattr(llama_plugin.Llama, "spec", later_spec)
    run = run_cli("export", base, "-o", root / "traced.onnx", "--with-past", "--verify",
                  "--json", "--overwrite")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert report["graph"].startswith("traced (the decoder description sets post_norms")
    assert report["max_abs_diff"] <= report["tolerance"]


def _info(base):
    from loraformat.base import open_base

    with open_base(base) as model:
        return model.info


@pytest.mark.parametrize("family,targets", [
    ("llama", None), ("phi3", None), ("gemma3", None), ("qwen2", ("q_proj", "v_proj")),
])
def test_slot_decoder_is_emitted_and_equals_peft_merge(family_setup, family, targets, tmp_path):
    """`export --lora-slots --with-past` of a built-in family comes from the emitter: slots on
    the packed projections (each layer's part of the packed output gets its own term), and the
    runtime Session with PEFT's adapter in the slots gives PEFT's merged logits through the
    KV cache; with no adapter, the base's."""
    from loraformat.export.slots import export_with_slots
    from loraformat.runtime import Session

    _, base, adapter = family_setup(family)
    if targets is not None:  # an adapter on q/v only, slots on q/v only
        adapter = tf.peft_adapter(base, family, tmp_path / "qv", target_modules=list(targets),
                                  lora_alpha=16)
    result = export_with_slots(base, tmp_path / "slots.onnx", with_past=True, targets=targets,
                               verify_output=True)
    assert result.traced.startswith("emitted")
    assert result.max_abs_diff <= result.tolerance
    layers = 2 * (2 if targets else (4 if family == "phi3" else 7))
    assert len(result.slots) == layers + (1 if targets is None and family != "gemma3" else 0)
    ops = [n.op_type for n in onnx.load(result.path).graph.node]
    assert ops.count("GroupQueryAttention") == 2

    ids = np.array([PROMPT, PROMPT[::-1]])
    merged = peft_merged(base, adapter)
    with torch.no_grad():
        want = merged(torch.from_numpy(ids)).logits.numpy()
        plain = tf.load_transformers(base)(torch.from_numpy(ids)).logits.numpy()
    with Session(result.path) as session:
        session.load("x", adapter)
        got = _session_steps(session, ids, 9, "x")
        none = _session_steps(session, ids, 9, None)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(none - plain).max() <= 1e-4 * np.abs(plain).max()


def _session_steps(session, ids: np.ndarray, split: int, adapter) -> np.ndarray:
    shapes = {i.name: i.shape for i in session.inner.get_inputs()}
    past = {n: np.zeros((ids.shape[0], s[1], 0, s[3]), np.float32) for n, s in shapes.items()
            if n.startswith("past_key_values.")}
    logits, start = [], 0
    for stop in [split, *range(split + 1, ids.shape[1] + 1)]:
        feed = {"input_ids": ids[:, start:stop],
                "attention_mask": np.ones((ids.shape[0], stop), np.int64),
                "position_ids": np.tile(np.arange(start, stop), (ids.shape[0], 1)), **past}
        out = session.run(feed, adapter=adapter)
        logits.append(out[0])
        presents = dict(zip(session.output_names[1:], out[1:], strict=True))
        past = {n.replace("present.", "past_key_values."): v for n, v in presents.items()}
        start = stop
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("family,side", [
    ("llama", "left"), ("mistral", "left"), ("gemma2", "left"), ("llama", "right"),
    ("qwen2", "left"), ("qwen3", "left"), ("gemma3", "left"), ("phi3", "left"),
])
def test_padded_batch_equals_each_prompt_alone(family_setup, family, side, tmp_path):
    """Two prompts of different lengths in one padded batch (transformers' layout: pad columns
    masked in attention_mask, position_ids counting each row's real tokens, padding 1 as
    transformers fills it), a prefill and two decode steps through the emitted merged decoder:
    each row's logits are those transformers gives (PEFT's merged model) for its prompt alone.
    Mistral and Gemma 2 with a 4-token window, left-padded: the window counts cache columns,
    as transformers' does, and a row's real tokens are contiguous there. (Right padding puts
    the decode steps after the pad columns, which a window counts, in transformers too: it is
    the prompt alone only without a window.) Qwen2's biases, Qwen3's q/k norms, Gemma 3's
    per-kind ropes; Phi-3's LongRoPE against transformers' own padded batch (one table for the
    batch)."""
    import onnxruntime

    _, base, adapter = family_setup(family)
    out = tmp_path / "merged.onnx"
    run = run_cli("merge", base, adapter, "-o", out, "--with-past", "--json", "--no-genai-config")
    assert run.code == 0, run.err
    assert json.loads(run.out)["graph"] == "emitted"

    prompts = [PROMPT[:5], PROMPT[2:]]  # 5 and 9 tokens: the shorter one is padded
    steps = [[8, 21], [30, 4]]  # the token each row is given at each decode step
    width = max(map(len, prompts))
    ids, mask = np.zeros((2, width), np.int64), np.zeros((2, width), np.int64)
    for row, prompt in enumerate(prompts):
        real = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, real], mask[row, real] = prompt, 1
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    ids_prompt, mask_prompt, pos_prompt = ids, mask, positions

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
    got = []
    for step in range(3):
        outputs = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                     "position_ids": positions, **past})
        got.append(outputs[0])
        past = {i.name: v for i, v in zip(pasts, outputs[1:], strict=True)}
        if step < 2:
            ids = np.array([[s[step]] for s in steps], np.int64)
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1 if side == "left" else \
                np.array([[len(p) + step] for p in prompts], np.int64)

    merged = peft_merged(base, adapter)
    if family == "phi3":
        # LongRoPE picks one table for the whole batch by its longest row (9 tokens > the 8 of
        # original_max_position_embeddings: the long factors), in transformers too, so the
        # shorter row's logits are those of transformers' own padded batch, not its prompt's
        # alone (the short factors): one causal pass over the padded prompt and both steps
        full_ids = np.concatenate([ids_prompt, np.array(steps, np.int64)], axis=1)
        full_mask = np.concatenate([mask_prompt, np.ones((2, 2), np.int64)], axis=1)
        full_pos = np.concatenate([pos_prompt, pos_prompt[:, -1:] + [1, 2]], axis=1)
        with torch.no_grad():
            batch = merged(torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
                           position_ids=torch.tensor(full_pos)).logits.numpy()
    for row, prompt in enumerate(prompts):
        if family == "phi3":
            want = batch[row, width - len(prompt):]
        else:
            with torch.no_grad():  # the prompt alone, then its two decode tokens: one pass
                want = merged(torch.tensor([prompt + steps[row]])).logits.numpy()[0]
        real = got[0][row, width - len(prompt):] if side == "left" else got[0][row, :len(prompt)]
        ours = np.concatenate([real, got[1][row], got[2][row]])
        scale = float(np.abs(want).max())
        assert np.abs(ours - want).max() <= 1e-4 * scale, (row, np.abs(ours - want).max())
