"""A GGUF LoRA written by loraformat, loaded by real llama.cpp on top of the tiny base converted by
llama.cpp's own ``convert_hf_to_gguf.py``, gives the loraformat-merged transformers model's logits.

Needs ``llama_cpp`` (llama-cpp-python, built from source) and ``LORAFORMAT_LLAMA_CPP_SRC`` = a
llama.cpp source tree (e.g. the one vendored in the llama-cpp-python sdist) for the base
conversion; skipped otherwise. The tiny checkpoints have no tokenizer, so the base is converted
with ``tokenizer.ggml.model = "no_vocab"`` and fed token ids. The KV cache is float32 (llama.cpp's
default f16 cache alone costs ~1e-3 on these logits).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from llama_cpp_convert import convert_hf_to_gguf
from test_interchange import linear_paths, make_adapter

from loraformat import interchange
from loraformat.base import open_base
from loraformat.format.adapter import Adapter
from loraformat.merge import merge_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")
SRC = os.environ.get("LORAFORMAT_LLAMA_CPP_SRC")
if not SRC or not (Path(SRC) / "convert_hf_to_gguf.py").is_file():
    pytest.skip("LORAFORMAT_LLAMA_CPP_SRC (a llama.cpp source tree) not given",
                allow_module_level=True)
pytestmark = pytest.mark.slow

def _base_gguf(checkpoint: Path, out: Path) -> Path:
    src = out.parent / "hf"
    shutil.copytree(checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    config.setdefault("n_ctx", config.get("n_positions"))  # llama.cpp's GPT-2 reads n_ctx
    (src / "config.json").write_text(json.dumps(config))
    return convert_hf_to_gguf(SRC, src, out)


def _logits(model: Path, lora: Path | None, ids: np.ndarray) -> np.ndarray:
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0, **kwargs)  # 0 = GGML_TYPE_F32
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("arch,scaling,embedding", [
    ("llama", "alpha/r", "model.embed_tokens"),  # mixed ranks, one folded alpha, token_embd
    ("llama", "alpha/sqrt(r)", None),
    ("gpt2", "alpha/r", None),  # Conv1D layers, fused attn_qkv
])
def test_llama_cpp_applies_gguf_adapter_like_merge(tiny_checkpoint, tmp_path, arch, scaling,
                                                   embedding):
    base_path = tiny_checkpoint(arch)
    with open_base(base_path) as base:
        paths = linear_paths(base) + ([embedding] if embedding else [])
        per = {paths[0]: {"rank": 2}, paths[1]: {"alpha": 3.0}} if scaling == "alpha/r" else {}
        adapter = make_adapter(base, paths, per_layer=per, scaling=scaling)
        layers = dict(adapter.layers())
        for layer in layers.values():
            layer.B = (layer.B * 0.1).astype(np.float32)  # a moderate change of the logits
        adapter = Adapter.from_layers(arch, layers, scaling=scaling)
    adapter.save(tmp_path / "lf")
    interchange.convert(tmp_path / "lf", tmp_path / "a.gguf", base=base_path)
    merge_checkpoint(base_path, [tmp_path / "lf"], tmp_path / "merged")
    ids = np.random.default_rng(0).integers(0, 96, 7)
    with torch.no_grad():
        expected = tiny_models.load_transformers(tmp_path / "merged", arch)(
            torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy()
        plain = tiny_models.load_transformers(base_path, arch)(
            torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy()
    model = _base_gguf(base_path, tmp_path / "base.gguf")
    # llama.cpp's GPT-2 GELU differs from transformers' by ~4e-5 on the plain base already.
    tol = 1e-4 if arch == "llama" else 1e-3
    np.testing.assert_allclose(_logits(model, None, ids), plain, atol=tol, rtol=0)
    assert np.abs(expected - plain).max() > 0.1
    np.testing.assert_allclose(_logits(model, tmp_path / "a.gguf", ids), expected, atol=tol,
                               rtol=0)
