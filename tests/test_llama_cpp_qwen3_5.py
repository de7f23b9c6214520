"""loraformat's Qwen3.5 GGUF LoRA against real llama.cpp (build 11434): llama.cpp's own converters
write the GGUF base and PEFT's merged model (``--no-mtp``: the tiny checkpoints have no
multi-token-prediction head) and the GGUF LoRA of the PEFT adapter; then loraformat's
``convert PEFT -o x.gguf --base CHECKPOINT`` has the converter's tensor names, architecture
(``qwen35``) and ΔW, and llama.cpp running it gives the logits llama.cpp gives PEFT's merge.

Two checkpoints, both with ``all-linear`` adapters: as many value heads as key heads in the
linear layers (llama.cpp keeps every order), and twice as many (llama.cpp reorders the value
heads: rows of ``in_proj_qkv``/``z``/``a``/``b`` and the input columns of ``out_proj``).
"""

from __future__ import annotations

import numpy as np
import pytest
import real_llama_cpp
import tiny_qwen35
from cli_harness import run_cli
from real_llama_cpp import lora_deltas
from test_llama_cpp_families import check_read_through_gguf_base

real_llama_cpp.home()  # skips the module when llama.cpp is not built (fails in make test)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("llama_cpp")]
IDS = np.random.default_rng(0).integers(3, tiny_qwen35.VOCAB - 4, 9)
#: The converter's MTP wiring asserts an MTP head unless told there is none; --no-mtp reaches
#: convert_hf_to_gguf.py only.
NO_MTP = "import conversion.qwen; conversion.qwen.Qwen3_5TextModel.no_mtp = True"
#: (checkpoint sizes, target_modules). Rank 2 with 2 value heads: in_proj_a/b have 2 rows, and
#: the format refuses a rank above a layer's smaller dimension (PEFT does not).
CASES = {
    "heads_equal": ({"linear_num_value_heads": 2}, "all-linear"),
    "heads_tiled": ({}, "all-linear"),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cpp_qwen3_5")
    made, jobs = {}, []
    for case, (sizes, targets) in CASES.items():
        d = root / case
        hf = tiny_qwen35.qwen3_5(d / "hf", **sizes)
        peft = tiny_qwen35.peft_adapter(hf, d / "peft", target_modules=targets, r=2)
        tiny_qwen35.peft_merged(hf, peft).save_pretrained(d / "merged")
        for model in (hf, d / "merged"):
            real_llama_cpp.write_vocab(model, tiny_qwen35.VOCAB)
        files = {"hf": hf, "peft": peft, "base": d / "base.gguf", "ref": d / "merged_ref.gguf",
                 "lora": d / "lora_ref.gguf"}
        jobs += [real_llama_cpp.hf_to_gguf(hf, files["base"], "--no-mtp"),
                 real_llama_cpp.hf_to_gguf(d / "merged", files["ref"], "--no-mtp"),
                 real_llama_cpp.lora_to_gguf(peft, hf, files["lora"])]
        made[case] = files
    real_llama_cpp.convert(jobs, setup=NO_MTP)
    return made


def _architecture(path) -> str:
    import gguf

    return gguf.GGUFReader(str(path)).fields["general.architecture"].contents()


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_lora_is_llama_cpp_converters(made, case, tmp_path):
    files = made[case]
    ours = tmp_path / "ours.gguf"
    result = run_cli("convert", files["peft"], "-o", ours, "--base", files["hf"])
    assert result.code == 0, result.err
    assert _architecture(ours) == _architecture(files["lora"]) == "qwen35"
    expected, got = lora_deltas(files["lora"]), lora_deltas(ours)
    assert sorted(got) == sorted(expected)
    assert {name.split(".")[2] for name in got} >= {"attn_qkv", "attn_gate", "ssm_alpha",
                                                       "ssm_beta", "attn_q", "ffn_down"}
    for name, delta in expected.items():
        np.testing.assert_allclose(got[name], delta, atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_runs_our_lora_as_peft_merge(made, case, tmp_path):
    files = made[case]
    expected = real_llama_cpp.logits(files["ref"], IDS)
    assert np.abs(expected - real_llama_cpp.logits(files["base"], IDS)).max() > 0.05
    ours = tmp_path / "ours.gguf"
    assert run_cli("convert", files["peft"], "-o", ours, "--base", files["hf"]).code == 0
    np.testing.assert_allclose(real_llama_cpp.logits(files["base"], IDS, ours), expected,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_into_gguf_base_is_peft_merge(made, case, tmp_path):
    """`merge base.gguf PEFT`: the linear sizes and layer kinds read from llama.cpp's metadata,
    ΔW added in the checkpoint's order and stored back in llama.cpp's (value heads tiled, rows
    and out_proj's columns): llama.cpp's logits of the result are those of PEFT's merge."""
    files = made[case]
    out = tmp_path / "merged.gguf"
    result = run_cli("merge", files["base"], files["peft"], "-o", out)
    assert result.code == 0, result.err
    np.testing.assert_allclose(real_llama_cpp.logits(out, IDS),
                               real_llama_cpp.logits(files["ref"], IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_lora_read_through_gguf_base_is_peft_delta(made, case, tmp_path):
    """`convert lora.gguf --base base.gguf --to peft` (llama.cpp's own LoRA, no checkpoint):
    Hugging Face names and order back (value heads untiled); ΔW equals the PEFT adapter's."""
    check_read_through_gguf_base(made[case], tmp_path)
