"""KV-cache ONNX export of merged mixture-of-experts decoders (issue 24 item 3): `merge BASE
ADAPTER -o m.onnx --with-past` writes each routed MLP as ONNX Runtime's ``MoE`` (float) or
``QMoE`` (int4) contrib op, as ONNX Runtime GenAI's builder does, with the PEFT adapter (attention,
router and ``target_parameters`` experts) merged per expert on the way.

References: transformers on PEFT's ``merge_and_unload`` (logits of a prefill and decode steps
through the graph's cache, 1e-4 of the logits' scale; greedy generation) and, for int4, the fp32
transformers logits (cosine). ONNX Runtime 1.32's CPU provider runs every graph here, float16
``MoE`` included.

The checkpoints are tests/tiny_moe.py's with hidden size 64 (GroupQueryAttention's CPU kernel
needs head sizes that are multiples of 16) and expert width 32 (QMoE quantizes in blocks of 32
along both the hidden and the expert width); gpt-oss's rope is YaRN as in the published models;
Qwen2-MoE's first layer keeps a dense MLP (``mlp_only_layers``).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
import torch
from cli_harness import run_cli
from test_decoder_emit import cosine, run_steps
from tiny_moe import FAMILIES, checkpoint, peft_adapter

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 33, 8, 90, 41, 12, 66, 3, 27, 54]
#: sizes every checkpoint here gets (see the module docstring)
SIZES = {"hidden_size": 64}


#: gpt-oss's published rope (YaRN, untruncated ramp), scaled down to the tiny context
GPT_OSS_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "original_max_position_embeddings": 16, "truncate": False}


def sizes(family: str) -> dict[str, object]:
    inner = "moe_intermediate_size" if family.startswith("qwen") else "intermediate_size"
    extra: dict[str, object] = {}
    if family == "gpt_oss":
        extra["rope_parameters"] = GPT_OSS_YARN
    if family == "qwen2_moe":  # layer 0 keeps a dense MLP (mlp_only_layers)
        extra["mlp_only_layers"] = [0]
    return {**SIZES, inner: 32, **extra}


def build(root, family: str) -> tuple:
    """(root, base, PEFT adapter dir, PEFT's merge_and_unload model) of ``family``."""
    base = checkpoint(family, root / "base", **sizes(family))
    adapter, peft_model = peft_adapter(family, base, root / "peft")
    return root, base, adapter, peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family → :func:`build`'s tuple, built once per module."""
    return functools.cache(lambda family: build(tmp_path_factory.mktemp(family), family))


def export(root, base, adapter, name: str, *options: str):
    out = root / name
    run = run_cli("merge", base, adapter, "-o", out, "--with-past", "--json", "--overwrite",
                  *options)
    assert run.code == 0, run.err
    assert json.loads(run.out)["graph"] == "emitted"
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_decoder_equals_peft_merge_and_generates_like_transformers(built, family):
    root, base, adapter, merged = built(family)
    out = export(root, base, adapter, "merged.onnx")
    ops = [n.op_type for n in onnx.load(out).graph.node]
    routed = 1 if family == "qwen2_moe" else 2
    assert ops.count("MoE") == routed and ops.count("GroupQueryAttention") == 2
    if family == "gpt_oss":  # sinks as GroupQueryAttention's head_sink input
        gqa = [n for n in onnx.load(out).graph.node if n.op_type == "GroupQueryAttention"]
        assert all(n.input[11].endswith("self_attn.sinks") for n in gqa)

    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref = merged(ids).logits.numpy()
        base_ref = type(merged).from_pretrained(base).eval()(ids).logits.numpy()
    scale = float(np.abs(ref).max())
    assert np.abs(base_ref - ref).max() > 0.1 * scale  # the adapter matters
    got = run_steps(out, ids.numpy(), 8)  # 8-token prefill, 3 decode steps
    assert np.abs(got - ref).max() <= 1e-4 * scale

    prompt = torch.tensor([PROMPT])
    expected = merged.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    run = run_cli("generate", out, "--prompt-ids", ",".join(map(str, PROMPT)),
                  "--max-new-tokens", "24", "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["new_ids"] == expected[0, len(PROMPT):].tolist()


def dequantized(graph, name_prefix: str) -> np.ndarray:
    """The QMoE initializers ``name_prefix`` + (.qweight_Q4, .scales, .zero_points) as float
    [E, N, K]: (q − zero point)·scale per block, nibbles low first (MatMulNBits' encoding)."""
    from onnx.numpy_helper import to_array

    inits = {i.name: i for i in graph.initializer}
    q = to_array(inits[name_prefix + ".qweight_Q4"])
    scales = to_array(inits[name_prefix + ".scales"])
    zp = to_array(inits[name_prefix + ".zero_points"])
    values = np.stack([q & 0xF, q >> 4], axis=-1).reshape(*q.shape[:2], -1).astype(np.float32)
    zeros = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(*zp.shape[:2], -1)
    blocks = scales.shape[-1]
    values = values.reshape(*q.shape[:2], blocks, -1)
    deq = (values - zeros[..., :blocks, None]) * scales[..., None]
    return deq.reshape(*q.shape[:2], -1)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_int4_qmoe_holds_the_merged_experts(built, family, record_property):
    """int4: experts as QMoE (block 32, asymmetric), attention as MatMulNBits. Each expert's
    dequantized fc1/fc2 is the merged expert weight (PEFT's merge_and_unload, gate/up rows
    interleaved, [out, in]) within half a quantization step; the logits' cosine to fp32 is
    reported. On these tiny random models (weights ~0.2, LoRA ×3, top-2 of 4 experts) int4 noise
    alone flips routing and gives ~0.8: with a float lm_head, the same attention and expert
    weights quantized and dequantized in numpy and run by transformers gave 0.807 for Qwen3-MoE,
    the QMoE graph 0.798 (now, head quantized too: Qwen3-MoE 0.795, gpt-oss 0.833)."""
    root, base, adapter, merged = built(family)
    out = export(root, base, adapter, "int4.onnx", "--dtype", "int4", "--block-size", "32")
    graph = onnx.load(out).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QMoE") == 2 and "MoE" not in ops
    qmoe = next(n for n in graph.node if n.op_type == "QMoE")
    assert qmoe.input[11] and qmoe.input[12]  # fc1/fc2 zero points

    experts = merged.model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj.detach().numpy()
    down = experts.down_proj.detach().numpy()
    if family == "gpt_oss":  # [E, in, out], gate/up columns already interleaved
        fc1, fc2 = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
    else:  # [E, out, in], [gate; up] rows
        half = gate_up.shape[1] // 2
        fc1 = np.stack([gate_up[:, :half], gate_up[:, half:]], axis=2).reshape(gate_up.shape)
        fc2 = down
    stack = "model.layers.1.mlp.experts."
    for weight, name in ((fc1, "gate_up_proj"), (fc2, "down_proj")):
        deq = dequantized(graph, stack + name)
        step = np.abs(onnx.numpy_helper.to_array(
            next(i for i in graph.initializer if i.name == stack + name + ".scales")))
        bound = np.repeat(step, 32, axis=-1) * 0.5 + 1e-5
        assert deq.shape == weight.shape
        assert np.all(np.abs(deq - weight) <= bound), name

    ids = np.array([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref = merged(torch.from_numpy(ids)).logits.numpy()
    cos = cosine(run_steps(out, ids, 8), ref)
    record_property("int4_cosine", cos)
    print(f"{family} int4 (QMoE) logits cosine to fp32: {cos:.5f}")
    assert cos > 0.75


def test_int8_qmoe_and_refusals(built, tmp_path):
    """int8 experts (QMoE, 8 bits) run. ONNX Runtime's CPU QMoE has no fp32 kernel for 8-bit
    experts: it quantizes the activations to int8 too (an isolated QMoE on these shapes gives
    cosine 0.9999 to numpy), and on this tiny random model that flips some top-2 choices, so the
    logits' cosine to fp32 is ~0.92 (asserted > 0.85). --verify, which runs
    a torch export module MoE plugins do not have, and a plain (cacheless) export are refused
    in one line naming the way that works; nothing is written."""
    root, base, adapter, merged = built("mixtral")
    out = export(root, base, adapter, "int8.onnx", "--dtype", "int8", "--block-size", "32")
    qmoe = [n for n in onnx.load(out).graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2
    assert {a.i for n in qmoe for a in n.attribute if a.name == "expert_weight_bits"} == {8}
    ids = np.array([PROMPT])
    with torch.no_grad():
        ref = merged(torch.from_numpy(ids)).logits.numpy()
    assert cosine(run_steps(out, ids, 8), ref) > 0.85

    for options in (("--with-past", "--verify"), ()):
        run = run_cli("merge", base, adapter, "-o", tmp_path / "x.onnx", *options)
        assert run.code != 0
        assert "exports as the KV-cache decoder (--with-past), without --verify" in run.err
        assert not (tmp_path / "x.onnx").exists()


def test_float16_moe_runs_on_cpu(built):
    root, base, adapter, merged = built("mixtral")
    out = export(root, base, adapter, "f16.onnx", "--dtype", "float16")
    assert "MoE" in [n.op_type for n in onnx.load(out).graph.node]
    ids = np.array([PROMPT])
    with torch.no_grad():
        ref = merged(torch.from_numpy(ids)).logits.numpy()
    assert cosine(run_steps(out, ids, 8, np.float16), ref) > 0.999


def test_qmoe_block_must_divide_expert_sizes(built, tmp_path):
    _, base, adapter, _ = built("qwen3_moe")
    run = run_cli("merge", base, adapter, "-o", tmp_path / "x.onnx", "--with-past", "--dtype",
                  "int4", "--block-size", "64")
    assert run.code != 0
    assert "QMoE quantizes in blocks of 64" in run.err and "32 features" in run.err
    assert not (tmp_path / "x.onnx").exists()


def test_onnxruntime_genai_runs_the_gpt_oss_export(built):
    """The folder `merge --with-past` writes (model.onnx + genai_config.json, model.type
    ``gptoss``) greedy-decodes in ONNX Runtime GenAI the tokens of transformers' generate on
    PEFT's merged model. (Qwen3-MoE, Qwen2-MoE and Mixtral have no ``model.type`` GenAI 0.18
    runs as a decoder: their folders get the config with a note, and only ORT runs them.)"""
    og = pytest.importorskip("onnxruntime_genai")
    root, base, adapter, merged = built("gpt_oss")
    folder = root / "genai"
    folder.mkdir()
    export(root, base, adapter, "genai/model.onnx")
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "gptoss"

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(PROMPT) + 24)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)][len(PROMPT):]

    prompt = torch.tensor([PROMPT])
    expected = merged.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    expected = expected[0, len(PROMPT):].tolist()
    eos = merged.config.eos_token_id
    if eos in expected:  # GenAI stops at the config's end-of-sequence token
        expected = expected[:expected.index(eos) + 1]
    assert got == expected


def test_lora_slots_on_the_attention_of_a_moe_decoder(built, tmp_path):
    """`export --with-past --lora-slots`: attention slots work on a MoE decoder (with their
    zero-rank defaults it is the base model); the default (every dense layer) includes the
    router and experts, which ONNX Runtime's MoE ops cannot take LoRA on: refused, naming the
    --targets that work."""
    _, base, _, merged = built("qwen3_moe")
    out = tmp_path / "slots.onnx"
    run = run_cli("export", base, "-o", out, "--with-past", "--lora-slots", "--targets",
                  "q_proj,v_proj")
    assert run.code == 0, run.err
    graph = onnx.load(out).graph
    assert sum("lora" in i.name.lower() for i in graph.input) >= 2 * 2 * 2  # A, B × q, v × 2
    ids = np.array([PROMPT])
    with torch.no_grad():
        ref = type(merged).from_pretrained(base).eval()(torch.from_numpy(ids)).logits.numpy()
    got = run_steps(out, ids, 8)
    assert np.abs(got - ref).max() <= 1e-4 * float(np.abs(ref).max())

    (tmp_path / "all").mkdir()
    run = run_cli("export", base, "-o", tmp_path / "all" / "all.onnx", "--with-past",
                  "--lora-slots")
    assert run.code != 0
    assert "MoE/QMoE ops take no LoRA on the router or the experts" in run.err
    assert "--targets q_proj,v_proj" in run.err and not list((tmp_path / "all").iterdir())
