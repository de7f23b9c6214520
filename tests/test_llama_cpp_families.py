"""loraformat against real llama.cpp (build 11434, ``tools/build_llama_cpp.py``) on seven decoder
families: LLaMA, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3.

For each tiny checkpoint and a PEFT adapter on every projection, llama.cpp's own converters write
the GGUF base, the GGUF of PEFT's merged model (``merge_and_unload``) and the GGUF LoRA
(``convert_lora_to_gguf.py``); all conversions run in one process, once per session. Then:

- loraformat's GGUF LoRA (``convert PEFT -o x.gguf --base CHECKPOINT``) has the converter's ΔW;
- llama.cpp with that LoRA at run time, and with loraformat's merge (``merge base.gguf PEFT``),
  gives the logits llama.cpp gives for PEFT's merged model;
- that merged file equals ``llama-export-lora``'s, also from llama.cpp's own GGUF LoRA (a
  llama.cpp-only user: ``merge base.gguf lora.gguf``) and into a Q8_0 base;
- a GGUF LoRA read through the GGUF base (``convert lora.gguf --base base.gguf``) is PEFT's ΔW.

llama.cpp runs with an F32 KV cache here, so runtime LoRA and merged weights agree to float
rounding (with its default f16 cache they differ by ~1e-3).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import real_llama_cpp
import tiny_families
import tiny_models
from cli_harness import run_cli
from real_llama_cpp import gguf_tensors, lora_deltas

real_llama_cpp.home()  # skips the module when llama.cpp is not built (fails in make test)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("llama_cpp")]  # one fixture, one worker
FAMILIES = ("llama", *tiny_families.FAMILIES)
#: Families whose LoRA llama.cpp's own convert_lora_to_gguf.py (build 11434) writes wrongly: for
#: Ministral 3 it writes general.type "model" and no adapter.lora.alpha, so llama.cpp refuses the
#: file as an adapter (llama-export-lora: "expect general.type to be 'adapter'").
CONVERTER_BROKEN = {"ministral3"}


def _families(broken_reason: str) -> list:
    """FAMILIES, the ones in CONVERTER_BROKEN marked as strict expected failures (so a fixed
    llama.cpp shows up)."""
    return [pytest.param(f, marks=pytest.mark.xfail(reason=broken_reason, strict=True))
            if f in CONVERTER_BROKEN else f for f in FAMILIES]
IDS = np.random.default_rng(0).integers(3, tiny_families.VOCAB, 9)  # crosses the 4-token windows


def _checkpoint(family: str, out):
    if family == "llama":
        return tiny_models.llama(out)
    return tiny_families.BUILDERS[family](out)


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """family → its files: ``hf`` base, ``peft`` adapter, llama.cpp's ``base.gguf``,
    ``merged_ref.gguf`` (PEFT's merge) and ``lora_ref.gguf``; plus ``q8`` (LLaMA base as Q8_0)."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("llama_cpp")
    made, jobs = {}, []
    for family in FAMILIES:
        d = root / family
        hf = _checkpoint(family, d / "hf")
        peft = tiny_families.peft_adapter(hf, family, d / "peft")
        merged = PeftModel.from_pretrained(tiny_families.load_transformers(hf), peft)
        merged.merge_and_unload().save_pretrained(d / "merged")
        for model in (hf, d / "merged"):
            real_llama_cpp.write_vocab(model, tiny_families.VOCAB)
        files = {"hf": hf, "peft": peft, "base": d / "base.gguf", "ref": d / "merged_ref.gguf",
                 "lora": d / "lora_ref.gguf"}
        jobs += [real_llama_cpp.hf_to_gguf(hf, files["base"]),
                 real_llama_cpp.hf_to_gguf(d / "merged", files["ref"]),
                 real_llama_cpp.lora_to_gguf(peft, hf, files["lora"])]
        made[family] = files
    made["q8"] = root / "llama" / "base_q8.gguf"
    jobs.append(("convert_hf_to_gguf.py", [str(made["llama"]["hf"]), "--outfile",
                                           str(made["q8"]), "--outtype", "q8_0"]))
    real_llama_cpp.convert(jobs)
    return made


def peft_deltas(directory) -> dict[str, np.ndarray]:
    """A PEFT adapter's ΔW per module path (read here with numpy)."""
    from safetensors.numpy import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {k.split("base_model.model.")[-1].removesuffix(".lora_A.weight"):
            scale * tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
            for k in tensors if k.endswith("lora_A.weight")}


def _merged(tmp_path, base, adapter, *args) -> object:
    out = tmp_path / "merged.gguf"
    result = run_cli("merge", base, adapter, "-o", out, *args)
    assert result.code == 0, result.err
    return out


@pytest.mark.parametrize("family", _families("llama.cpp's converter writes no adapter alpha"))
def test_gguf_lora_has_llama_cpp_converters_delta(made, family, tmp_path):
    files = made[family]
    ours = tmp_path / "ours.gguf"
    result = run_cli("convert", files["peft"], "-o", ours, "--base", files["hf"])
    assert result.code == 0, result.err
    expected, got = lora_deltas(files["lora"]), lora_deltas(ours)
    assert sorted(got) == sorted(expected)
    for name, delta in expected.items():
        np.testing.assert_allclose(got[name], delta, atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_lora_and_merge_give_peft_merges_logits(made, family, tmp_path):
    """Mistral's GGUF says ``llama``, Gemma 3's PEFT adapter does not say its model: both merge
    through the GGUF base alone."""
    files = made[family]
    expected = real_llama_cpp.logits(files["ref"], IDS)
    plain = real_llama_cpp.logits(files["base"], IDS)
    assert np.abs(expected - plain).max() > 0.05  # the adapter changes the logits
    ours = tmp_path / "ours.gguf"
    assert run_cli("convert", files["peft"], "-o", ours, "--base", files["hf"]).code == 0
    np.testing.assert_allclose(real_llama_cpp.logits(files["base"], IDS, ours), expected,
                               atol=1e-4, rtol=0)
    merged = _merged(tmp_path, files["base"], files["peft"])
    np.testing.assert_allclose(real_llama_cpp.logits(merged, IDS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("adapter", ["peft", "lora"])
def test_merged_file_equals_llama_export_lora(made, family, adapter, tmp_path):
    """``merge base.gguf ADAPTER`` with PEFT's adapter, and with llama.cpp's own GGUF LoRA (a
    llama.cpp-only user, no checkpoint anywhere), writes export-lora's tensors. Where llama.cpp's
    converter writes no usable LoRA, export-lora is given loraformat's."""
    files = made[family]
    lora = files["lora"]
    if family in CONVERTER_BROKEN:
        if adapter == "lora":
            pytest.xfail("llama.cpp's converter writes no adapter for this family")
        lora = tmp_path / "ours.gguf"
        assert run_cli("convert", files["peft"], "-o", lora, "--base", files["hf"]).code == 0
    exported = gguf_tensors(real_llama_cpp.export_lora(files["base"], lora,
                                                   tmp_path / "export.gguf"))
    merged = gguf_tensors(_merged(tmp_path, files["base"], files[adapter]))
    assert sorted(merged) == sorted(exported)
    for name, tensor in exported.items():
        np.testing.assert_allclose(merged[name], tensor, atol=2e-6, rtol=0, err_msg=name)


def test_q8_0_base_merge_equals_llama_export_lora(made, tmp_path):
    """Into a Q8_0 base: export-lora writes merged tensors as F16; ``--type F16`` writes the same,
    and the default (Q8_0 kept) is within one Q8_0 step of it, with llama.cpp's logits."""
    files = made["llama"]
    exported = gguf_tensors(real_llama_cpp.export_lora(made["q8"], files["lora"],
                                                   tmp_path / "export.gguf"))
    as_f16 = gguf_tensors(_merged(tmp_path, made["q8"], files["peft"], "--type", "F16"))
    (tmp_path / "merged.gguf").unlink()
    as_q8 = _merged(tmp_path, made["q8"], files["peft"])
    q8 = gguf_tensors(as_q8)
    for name, tensor in exported.items():
        np.testing.assert_allclose(as_f16[name], tensor, rtol=1e-3, atol=1e-6, err_msg=name)
        step = np.abs(tensor).max() / 127
        np.testing.assert_allclose(q8[name], tensor, atol=step, rtol=0, err_msg=name)
    expected = real_llama_cpp.logits(files["ref"], IDS)
    np.testing.assert_allclose(real_llama_cpp.logits(as_q8, IDS), expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "phi3"])
def test_gguf_lora_read_through_gguf_base_is_peft_delta(made, family, tmp_path):
    """``convert lora.gguf --base base.gguf -o peft/``: Hugging Face names and row order from the
    GGUF base alone; ΔW equals the original PEFT adapter's (read here with numpy)."""
    check_read_through_gguf_base(made[family], tmp_path)


def check_read_through_gguf_base(files, tmp_path) -> None:
    """llama.cpp's GGUF LoRA converted to PEFT through the GGUF base has the PEFT adapter's
    names and ΔW."""
    result = run_cli("convert", files["lora"], "--base", files["base"], "-o", tmp_path / "p",
                     "--to", "peft")
    assert result.code == 0, result.err
    got, expected = peft_deltas(tmp_path / "p"), peft_deltas(files["peft"])
    assert sorted(got) == sorted(expected)
    for name, delta in expected.items():
        np.testing.assert_allclose(got[name], delta, atol=1e-6, rtol=0, err_msg=name)


def test_merge_base_option_reads_adapter_through_gguf_model(made, tmp_path):
    """``merge`` has ``--base`` as ``convert`` does: a GGUF LoRA merged into a checkpoint, read
    through the GGUF model, equals the PEFT adapter's merge."""
    files = made["qwen3"]
    out = tmp_path / "m"
    result = run_cli("merge", files["hf"], files["lora"], "--base", files["base"], "-o", out)
    assert result.code == 0, result.err
    from safetensors.numpy import load_file

    reference = load_file(files["hf"].parent / "merged" / "model.safetensors")  # PEFT's merge
    ours = load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        np.testing.assert_allclose(ours[name], tensor, atol=1e-6, rtol=0, err_msg=name)
