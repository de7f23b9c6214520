"""Merging into llama.cpp GGUF model files: a tiny LLaMA written with gguf-py in llama.cpp's names
and q/k row order (what convert_hf_to_gguf.py writes), merged with a PEFT adapter.

References: PEFT's merge_and_unload (F32: equal), gguf-py's quantizer on dequantize(W) + ΔW
(quantized types: byte-equal), and the input file (untouched tensors and metadata: byte-equal).
Real llama.cpp is not installed here; test_interchange_llama_cpp.py shows how it would be run.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import tiny_models
from test_cli_errors import assert_one_line_error, run

from loraformat.architecture.decoder import gguf_permutation
from loraformat.errors import LoraformatError
from loraformat.interchange import open_adapter
from loraformat.merge.gguf import merge_gguf
from loraformat.merge.plan import MERGED_KEY, adapter_id

pytestmark = pytest.mark.slow  # PEFT references

BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    """llama.cpp's tensor name for a transformers LLaMA tensor name."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, n, rest = hf.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{n}.{BLOCK[module]}.{suffix}"


def llama_cpp_order(hf: str, array: np.ndarray, config: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation (n_head for q, n_head_kv for k)."""
    if hf.endswith("q_proj.weight"):
        return array[gguf_permutation(array.shape[0], config["num_attention_heads"])]
    if hf.endswith("k_proj.weight"):
        return array[gguf_permutation(array.shape[0], config["num_key_value_heads"])]
    return array


def write_model(tensors: dict[str, np.ndarray], config: dict, out: Path, kind: str) -> Path:
    """A GGUF model as llama.cpp's converter lays it out: 2-D weights in ``kind``, norms F32."""
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_string("general.name", "tiny")
    qtype = gguf.GGMLQuantizationType[kind]
    for hf, array in tensors.items():
        array = llama_cpp_order(hf, array.astype(np.float32), config)
        if array.ndim == 2 and kind != "F32":
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_name(hf), data, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(hf), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def read_model(path: Path) -> dict[str, tuple[str, np.ndarray, bytes]]:
    """name → (type, float32 values, raw bytes), read with gguf-py alone."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type.name, np.asarray(values, np.float32), bytes(t.data))
    return out


def hf_tensors(base: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(base / "model.safetensors"))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-merge")
    base = tiny_models.llama(root / "hf", rope_scaling=False)
    config = json.loads((base / "config.json").read_text())
    adapter = tiny_models.peft_adapter(
        base, "llama", root / "peft", target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"],
    )
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_models.load_transformers(base, "llama"), adapter)
    merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    return SimpleNamespace(base=base, config=config, adapter=adapter, tensors=hf_tensors(base),
                           merged=merged)


def _same_metadata_and_record(merged: Path, model: Path, adapter: Path) -> None:
    """Every key-value of the base, plus the record of the adapter merged in."""
    written, source = gguf.GGUFReader(str(merged)), gguf.GGUFReader(str(model))
    got = {n: f.contents() for n, f in written.fields.items() if not n.startswith("GGUF.")}
    want = {n: f.contents() for n, f in source.fields.items() if not n.startswith("GGUF.")}
    assert got.pop(MERGED_KEY) == json.dumps([adapter_id(open_adapter(adapter))])
    assert got == want


def test_f32_merge_equals_peft(lm, tmp_path):
    config, adapter, tensors, merged = lm.config, lm.adapter, lm.tensors, lm.merged
    model = write_model(tensors, config, tmp_path / "base.gguf", "F32")
    result = merge_gguf(model, [open_adapter(adapter)], tmp_path / "merged.gguf")
    assert result.tensors_changed == 14 and result.layers == 14
    got = read_model(tmp_path / "merged.gguf")
    before = read_model(model)
    for hf, value in merged.items():
        name = gguf_name(hf)
        kind, values, raw = got[name]
        assert kind == "F32"
        expected = llama_cpp_order(hf, value, config)
        if "proj" in hf:
            np.testing.assert_allclose(values, expected, rtol=0, atol=2e-6, err_msg=name)
            assert not np.array_equal(values, before[name][1])
        else:
            assert raw == before[name][2], name
    _same_metadata_and_record(tmp_path / "merged.gguf", model, adapter)
    assert result.survival is None  # F32 stores the merge exactly: no report


def _expected_quantized(hf: str, before: np.ndarray, delta_hf: np.ndarray, config: dict,
                        kind: str) -> bytes:
    target = before + llama_cpp_order(hf, delta_hf, config)
    return bytes(gguf.quants.quantize(target.astype(np.float32), gguf.GGMLQuantizationType[kind]))


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q5_1", "Q4_0"])
def test_quantized_merge_keeps_types_and_requantizes(lm, tmp_path, kind):
    config, adapter, tensors, merged = lm.config, lm.adapter, lm.tensors, lm.merged
    model = write_model(tensors, config, tmp_path / "base.gguf", kind)
    result = merge_gguf(model, [open_adapter(adapter)], tmp_path / "merged.gguf")
    got, before = read_model(tmp_path / "merged.gguf"), read_model(model)
    assert set(got) == set(before)
    mismatched = 0
    for hf in tensors:
        name = gguf_name(hf)
        assert got[name][0] == before[name][0], name  # every tensor keeps its type
        if "proj" not in hf:
            assert got[name][2] == before[name][2], name  # untouched: byte-identical
            continue
        delta = merged[hf] - tensors[hf]  # PEFT's ΔW, Hugging Face row order
        expected = _expected_quantized(hf, before[name][1], delta, config, kind)
        if got[name][2] != expected:
            # ΔW from PEFT (torch) and from loraformat (numpy) may differ in the last bit, which
            # can move a value across a rounding boundary: allow one step on a few values.
            a = got[name][1]
            shape = a.shape
            b = gguf.quants.dequantize(
                np.frombuffer(expected, np.uint8).reshape(
                    gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[kind])
                    if kind != "F16" else (-1,)), gguf.GGMLQuantizationType[kind]).reshape(shape)
            mismatched += int(np.count_nonzero(a != b))
    assert mismatched <= 2, mismatched
    _same_metadata_and_record(tmp_path / "merged.gguf", model, adapter)
    assert len(result.survival.layers) == 14


def test_type_option_relayouts_and_round_trips(lm, tmp_path):
    config, adapter, tensors, merged = lm.config, lm.adapter, lm.tensors, lm.merged
    model = write_model(tensors, config, tmp_path / "base.gguf", "Q4_0")
    result = merge_gguf(model, [open_adapter(adapter)], tmp_path / "merged.gguf", qtype="q8_0")
    assert set(result.types.values()) == {"Q8_0"}
    got, before = read_model(tmp_path / "merged.gguf"), read_model(model)
    _same_metadata_and_record(tmp_path / "merged.gguf", model, adapter)
    for hf in tensors:
        name = gguf_name(hf)
        if "proj" in hf:
            assert got[name][0] == "Q8_0"
            target = before[name][1] + llama_cpp_order(hf, merged[hf] - tensors[hf], config)
            step = np.abs(target).max() / 127
            np.testing.assert_allclose(got[name][1], target, atol=step)
        else:
            assert got[name][:1] == before[name][:1] and got[name][2] == before[name][2]


def test_survival_small_adapter_q4_vs_q8(lm, tmp_path):
    """An adapter far below the Q4_0 step mostly vanishes; Q8_0 keeps most of it."""
    base, config, tensors = lm.base, lm.config, lm.tensors
    small = tiny_models.peft_adapter(base, "llama", tmp_path / "small", seed=3,
                                     target_modules=["q_proj", "v_proj"], lora_alpha=0.02)
    shares = {}
    for kind in ("Q4_0", "Q8_0"):
        model = write_model(tensors, config, tmp_path / f"{kind}.gguf", kind)
        result = merge_gguf(model, [open_adapter(small)], tmp_path / f"m-{kind}.gguf")
        shares[kind] = result.survival
    q4, q8 = shares["Q4_0"], shares["Q8_0"]
    assert q4.share < 0.2, q4.table()
    assert q8.share > 0.9, q8.table()
    warning = q4.warning()
    assert warning is not None and "blk.0.attn_q.weight" in warning and "--lora" in warning
    assert q8.share > q4.share
    # the figures agree with their definitions, recomputed from the files and PEFT's A, B
    from safetensors.numpy import load_file

    peft = load_file(str(small / "adapter_model.safetensors"))
    scale = 0.02 / 4
    for kind, report in shares.items():
        got, before = read_model(tmp_path / f"m-{kind}.gguf"), read_model(tmp_path / f"{kind}.gguf")
        for layer in report.layers:
            n, proj = layer.name.split(".")[1], layer.name.split(".")[2][-1]
            key = f"base_model.model.model.layers.{n}.self_attn.{proj}_proj"
            hf = f"model.layers.{n}.self_attn.{proj}_proj.weight"
            delta = scale * (peft[key + ".lora_B.weight"].astype(np.float64)
                             @ peft[key + ".lora_A.weight"].astype(np.float64))
            delta = llama_cpp_order(hf, delta, config)
            change = got[layer.name][1].astype(np.float64) - before[layer.name][1]
            assert layer.delta_norm == pytest.approx(np.linalg.norm(delta), rel=1e-5)
            assert layer.carried == pytest.approx(np.vdot(change, delta), rel=1e-4, abs=1e-12)
            error = got[layer.name][1] - (before[layer.name][1] + delta)
            assert layer.error_norm == pytest.approx(np.linalg.norm(error), rel=1e-4)


def test_cli_gguf_merge_json_and_warning(lm, tmp_path):
    base, config, tensors = lm.base, lm.config, lm.tensors
    small = tiny_models.peft_adapter(base, "llama", tmp_path / "small", seed=3,
                                     target_modules=["q_proj"], lora_alpha=0.02)
    model = write_model(tensors, config, tmp_path / "base.gguf", "Q4_0")
    code, out, err = run("merge", model, small, "-o", tmp_path / "m.gguf", "--json",
                         inputs=[model])
    assert code == 0, err
    data = json.loads(out)
    assert data["tensors_changed"] == 2
    assert {layer["tensor"] for layer in data["survival"]["layers"]} == {
        "blk.0.attn_q.weight", "blk.1.attn_q.weight"}
    assert data["survival"]["warning"] and data["survival"]["share"] < 0.5
    code, out, err = run("merge", model, small, "-o", tmp_path / "t.gguf")
    assert code == 0, err
    assert "share" in out and "warning:" in err and "--lora" in err


def test_k_quant_output_refused(lm, tmp_path):
    config, adapter, tensors = lm.config, lm.adapter, lm.tensors
    model = write_model(tensors, config, tmp_path / "base.gguf", "F32")
    with pytest.raises(LoraformatError, match=r"cannot write GGUF type Q4_K .*--type Q8_0"):
        merge_gguf(model, [open_adapter(adapter)], tmp_path / "m.gguf", qtype="Q4_K")
    assert not (tmp_path / "m.gguf").exists()
    assert_one_line_error(
        run("merge", model, adapter, "-o", tmp_path / "m.gguf", "--type", "Q4_K"), model, "Q4_K"
    )


def test_wrong_architecture_and_shape_refused(lm, tiny_checkpoint, tmp_path):
    config, tensors = lm.config, lm.tensors
    model = write_model(tensors, config, tmp_path / "base.gguf", "F32")
    gpt2 = tiny_checkpoint("gpt2")
    other = tiny_models.peft_adapter(gpt2, "gpt2", tmp_path / "g")
    with pytest.raises(LoraformatError, match="architecture 'gpt2'"):
        merge_gguf(model, [open_adapter(other)], tmp_path / "m.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(LoraformatError, match="not a readable GGUF file"):
        merge_gguf(tmp_path / "bad.gguf", [open_adapter(other)], tmp_path / "m.gguf")


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_embedding_and_head(lm, tmp_path, kind):
    """token_embd (an embedding: ΔW is added transposed) and output (lm_head) merge like PEFT."""
    from peft import PeftModel

    adapter = tiny_models.peft_adapter(lm.base, "llama", tmp_path / "emb", seed=5,
                                       target_modules=["embed_tokens", "lm_head", "k_proj"])
    model = PeftModel.from_pretrained(tiny_models.load_transformers(lm.base, "llama"), adapter)
    merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    base = write_model(lm.tensors, lm.config, tmp_path / "base.gguf", kind)
    result = merge_gguf(base, [open_adapter(adapter)], tmp_path / "m.gguf")
    assert result.tensors_changed == 4
    got, before = read_model(tmp_path / "m.gguf"), read_model(base)
    for hf in ("model.embed_tokens.weight", "lm_head.weight",
               "model.layers.1.self_attn.k_proj.weight"):
        name = gguf_name(hf)
        target = before[name][1] + llama_cpp_order(hf, merged[hf] - lm.tensors[hf], lm.config)
        if kind == "F32":
            np.testing.assert_allclose(got[name][1], target, atol=2e-6, err_msg=name)
        else:
            expected = gguf.quants.quantize(target.astype(np.float32),
                                            gguf.GGMLQuantizationType.Q8_0)
            mismatched = np.count_nonzero(np.frombuffer(got[name][2], np.uint8) !=
                                          np.ascontiguousarray(expected).reshape(-1))
            assert mismatched <= 2, (name, mismatched)


GPT2_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gpt2_gguf_name(hf: str) -> str:
    _, rest = hf.split(".", 1)
    module, suffix = rest.rsplit(".", 1)
    if module in GPT2_NAMES:
        return f"{GPT2_NAMES[module]}.{suffix}"
    _, n, sub = module.split(".", 2)
    return f"blk.{n}.{GPT2_BLOCK[sub]}.{suffix}"


def test_gpt2_conv1d_fused_qkv(tiny_checkpoint, tmp_path):
    """GPT-2 as llama.cpp stores it: Conv1D weights transposed to [out, in], fused attn_qkv."""
    from peft import PeftModel
    from safetensors.numpy import load_file

    base = tiny_checkpoint("gpt2")
    config = json.loads((base / "config.json").read_text())
    tensors = {k: v for k, v in load_file(str(base / "model.safetensors")).items()
               if not k.endswith(".attn.bias") and not k.endswith("masked_bias")}
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(config["n_layer"])
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(4 * config["n_embd"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(1e-5)
    for hf, array in tensors.items():
        array = array.T if hf.endswith(conv1d) else array
        writer.add_tensor(gpt2_gguf_name(hf), np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    adapter = tiny_models.peft_adapter(base, "gpt2", tmp_path / "peft",
                                       target_modules=["c_attn", "c_proj", "c_fc"])
    model = PeftModel.from_pretrained(tiny_models.load_transformers(base, "gpt2"), adapter)
    merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    result = merge_gguf(tmp_path / "gpt2.gguf", [open_adapter(adapter)], tmp_path / "m.gguf")
    assert result.tensors_changed == 8
    got, before = read_model(tmp_path / "m.gguf"), read_model(tmp_path / "gpt2.gguf")
    for hf in tensors:
        name = gpt2_gguf_name(hf)
        if hf.endswith(conv1d):  # every Conv1D weight is adapted
            np.testing.assert_allclose(got[name][1], merged[hf].T, atol=2e-6, err_msg=name)
            assert not np.array_equal(got[name][1], before[name][1])
        else:
            assert got[name][2] == before[name][2], name
