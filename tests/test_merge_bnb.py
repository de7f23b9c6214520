"""Merging into bitsandbytes 4-bit checkpoints (QLoRA's deployment step).

The bases are real: a tiny LLaMA quantized by transformers + bitsandbytes (CPU backend) and saved
with ``save_pretrained``. References: bitsandbytes' own ``QuantState.from_dict`` (parses the
on-disk layout) and its reference dequantization/quantization kernels, PEFT for ΔW, and
transformers loading the outputs. Hidden size 64, so every weight row is whole 64-value blocks:
bitsandbytes' CPU dequantization kernel (used by transformers on CPU) agrees with its reference
kernel only then.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_models
import torch
from test_cli_errors import assert_one_line_error, run

from loraformat.errors import LoraformatError
from loraformat.format.safetensors_io import SafetensorsFile
from loraformat.interchange import open_adapter
from loraformat.merge.bnb import is_bnb4, merge_bnb
from loraformat.quant import bnb4

bnb_functional = pytest.importorskip("bitsandbytes.functional")
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # transformers, peft
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama64(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return out


def _quantize(base: Path, out: Path, quant_type: str, nested: bool) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=nested,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config,
                                                 device_map="cpu")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    base = _llama64(root / "float")
    adapter = tiny_models.peft_adapter(base, "llama", root / "peft", target_modules=TARGETS)
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_models.load_transformers(base, "llama"), adapter)
    float_sd = {k: v.numpy().copy() for k, v in
                tiny_models.load_transformers(base, "llama").state_dict().items()}
    merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    deltas = {k: merged[k].astype(np.float64) - float_sd[k] for k in merged if "proj" in k}
    return SimpleNamespace(
        root=root, base=base, adapter=adapter, deltas=deltas,
        nf4=_quantize(base, root / "nf4", "nf4", True),
        fp4=_quantize(base, root / "fp4", "fp4", False),
    )


def _tensors(path: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path / "model.safetensors") as st:
        return {name: np.array(st.numpy(name)) for name in st}


def _bnb_state(tensors: dict[str, np.ndarray], weight: str):
    """bitsandbytes' own parse of the on-disk layout."""
    prefix = weight + "."
    qs = {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items()
          if k.startswith(prefix)}
    return bnb_functional.QuantState.from_dict(qs, device=torch.device("cpu"))


def _bnb_reference(tensors: dict[str, np.ndarray], weight: str) -> np.ndarray:
    """bitsandbytes' reference 4-bit dequantization (its default backend)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    state = _bnb_state(tensors, weight)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = torch.from_numpy(tensors[weight]).reshape(-1)
    return _dequantize_4bit_compute(packed, absmax.float(), state.code, state.blocksize,
                                    state.shape, torch.float32).numpy()


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_dequantize_equals_bitsandbytes(qlora, kind):
    tensors = _tensors(getattr(qlora, kind))
    weights = [n for n in tensors if bnb4.state_key(n, tensors)]
    assert len(weights) == 14
    for name in weights:
        state = bnb4.read_state(tensors, name)
        mine = bnb4.dequantize(tensors[name], state)
        np.testing.assert_array_equal(mine, _bnb_reference(tensors, name), err_msg=name)
        # the kernel transformers runs on CPU agrees too (rows are whole blocks here)
        bnb = bnb_functional.dequantize_4bit(torch.from_numpy(tensors[name]),
                                             _bnb_state(tensors, name)).numpy()
        np.testing.assert_array_equal(mine, bnb, err_msg=name)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_quantize_equals_bitsandbytes(qlora, kind):
    tensors = _tensors(getattr(qlora, kind))
    name = "model.layers.0.mlp.down_proj.weight"
    state = bnb4.read_state(tensors, name)
    values = np.random.default_rng(0).standard_normal(state.shape).astype(np.float32)
    packed, aux = bnb4.quantize(values, state)
    ref, ref_state = bnb_functional.quantize_4bit(
        torch.from_numpy(values), blocksize=state.blocksize, quant_type=kind,
        compress_statistics=state.nested)
    np.testing.assert_array_equal(packed, ref.numpy())  # same 4-bit codes
    ref_dict = {k: v.numpy() for k, v in ref_state.as_dict(packed=True).items()}
    mine_state = bnb4.requantized_state(aux, state)
    ref_absmax = bnb4.read_state({name: ref.numpy()} | {f"{name}.{k}": v for k, v in
                                                         ref_dict.items()}, name).absmax
    # bitsandbytes averages the absmax values in another order: the offset may differ in the
    # last bit, and the nested absmax with it
    np.testing.assert_allclose(mine_state.absmax, ref_absmax, rtol=1e-6)
    assert set(aux) - {"quant_state"} == {"." + k for k in ref_dict
                                          if not k.startswith("quant_state")}


def test_float_merge(qlora, tmp_path):
    result = merge_bnb(qlora.nf4, [open_adapter(qlora.adapter)], tmp_path / "merged")
    assert result.tensors_changed == 14 and not result.requantized and result.survival is None
    before, after = _tensors(qlora.nf4), _tensors(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert not any(bnb4.AUX_SUFFIXES[0] in n or "quant_state" in n for n in after)
    for name, value in after.items():
        if name in qlora.deltas:
            w = bnb4.dequantize(before[name], bnb4.read_state(before, name))
            assert value.dtype == np.float32
            np.testing.assert_allclose(value, w + qlora.deltas[name], rtol=0, atol=2e-6)
        else:
            np.testing.assert_array_equal(value, before[name])  # untouched: same bytes
    # transformers loads it as a plain float model computing what PEFT (unmerged) computes on
    # the float model holding bitsandbytes' dequantized weights. (Not PEFT on the 4-bit model
    # itself: bitsandbytes' CPU 4-bit matmul is off from its own dequantized weights by ~2e-3.)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = tiny_models.load_transformers(qlora.base, "llama")
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in qlora.deltas:
                param.copy_(torch.from_numpy(_bnb_reference(before, name)))
    reference = PeftModel.from_pretrained(reference, qlora.adapter).eval()
    ids = tiny_models.example_inputs("llama")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.numpy()
        got = merged(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_requantize(qlora, tmp_path, kind):
    base = getattr(qlora, kind)
    result = merge_bnb(base, [open_adapter(qlora.adapter)], tmp_path / "merged", requantize=True)
    assert result.requantized and len(result.survival.layers) == 14
    before, after = _tensors(base), _tensors(tmp_path / "merged")
    assert set(before) == set(after)
    assert (tmp_path / "merged" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    for name in before:
        weight = name.split(".weight")[0] + ".weight"
        if weight not in qlora.deltas:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in qlora.deltas:
        state = bnb4.read_state(before, name)
        target = bnb4.dequantize(before[name], state) + qlora.deltas[name].astype(np.float32)
        ref, _ = bnb_functional.quantize_4bit(torch.from_numpy(target), blocksize=64,
                                              quant_type=kind, compress_statistics=state.nested)
        codes_differ = np.count_nonzero(after[name] != ref.numpy())
        assert codes_differ <= 2, (name, codes_differ)  # PEFT's ΔW vs ours: last-bit ties
        # bitsandbytes parses what was written
        got = bnb_functional.dequantize_4bit(torch.from_numpy(after[name]),
                                             _bnb_state(after, name)).numpy()
        np.testing.assert_allclose(got, bnb4.dequantize(after[name], bnb4.read_state(after, name)),
                                   rtol=0, atol=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert 0 <= result.survival.share <= 1.2


def test_sharded_float_merge(qlora, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(qlora.base, quantization_config=config,
                                                 device_map="cpu")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    result = merge_bnb(tmp_path / "sharded", [open_adapter(qlora.adapter)], tmp_path / "merged")
    assert result.shards == len(set(index["weight_map"].values()))
    out_index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert not any("absmax" in n or "quant" in n for n in out_index["weight_map"])
    single = merge_bnb(qlora.nf4, [open_adapter(qlora.adapter)], tmp_path / "single")
    assert single.shards == 1
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_survival_small_adapter_warns(qlora, tmp_path):
    small = tiny_models.peft_adapter(qlora.base, "llama", tmp_path / "small", seed=3,
                                     target_modules=["q_proj"], lora_alpha=0.02)
    result = merge_bnb(qlora.nf4, [open_adapter(small)], tmp_path / "merged", requantize=True)
    assert result.survival.share < 0.2
    warning = result.survival.warning()
    assert warning and "model.layers.0.self_attn.q_proj.weight" in warning
    assert "omit --requantize" in warning
    big = merge_bnb(qlora.nf4, [open_adapter(qlora.adapter)], tmp_path / "big", requantize=True)
    assert big.survival.share > result.survival.share


def test_cli_and_refusals(qlora, tmp_path):
    assert is_bnb4(qlora.nf4) and not is_bnb4(qlora.base)
    code, out, err = run("merge", qlora.nf4, qlora.adapter, "-o", tmp_path / "m", "--requantize",
                         "--json", inputs=[qlora.nf4 / "model.safetensors"])
    assert code == 0, err
    data = json.loads(out)
    assert data["tensors_changed"] == 14 and len(data["survival"]["layers"]) == 14
    code, out, err = run("merge", qlora.nf4, qlora.adapter, "-o", tmp_path / "f")
    assert code == 0 and "survival" not in out, err
    code, _, err = run("merge", qlora.nf4, qlora.adapter, "-o", tmp_path / "t", "--type", "Q8_0")
    assert code == 2 and "--type is for GGUF" in err
    code, _, err = run("merge", qlora.base, qlora.adapter, "-o", tmp_path / "r", "--requantize")
    assert code == 2
    code, _, err = run("unmerge", qlora.nf4, qlora.adapter, "-o", tmp_path / "u")
    assert code == 2 and "not supported" in err
    eight = tmp_path / "eight"
    eight.mkdir()
    config = json.loads((qlora.nf4 / "config.json").read_text())
    config["quantization_config"].update(load_in_4bit=False, load_in_8bit=True)
    (eight / "config.json").write_text(json.dumps(config))
    (eight / "model.safetensors").write_bytes((qlora.nf4 / "model.safetensors").read_bytes())
    assert_one_line_error(run("merge", eight, qlora.adapter, "-o", tmp_path / "e"), eight,
                          "8-bit")
    with pytest.raises(LoraformatError, match="lacks"):
        tensors = _tensors(qlora.nf4)
        name = "model.layers.0.self_attn.q_proj.weight"
        del tensors[name + ".absmax"]
        bnb4.read_state(tensors, name)
