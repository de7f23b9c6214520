"""A GGUF LoRA written by loraformat, loaded by real llama.cpp (``tests/real_llama_cpp.py``) on
top of the tiny base converted by llama.cpp's own ``convert_hf_to_gguf.py``, gives the
loraformat-merged transformers model's logits: mixed ranks and alphas folded into one file alpha,
rsLoRA, the token embedding, GPT-2's Conv1D layers and fused ``attn_qkv``.

The tiny checkpoints have no tokenizer, so the base is converted with ``tokenizer.ggml.model =
"no_vocab"`` and fed token ids. The KV cache is float32 (llama.cpp's default f16 cache alone costs
~1e-3 on these logits).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import real_llama_cpp
import tiny_models
import torch
from test_interchange import linear_paths, make_adapter

from loraformat import interchange
from loraformat.base import open_base
from loraformat.format.adapter import Adapter
from loraformat.merge import merge_checkpoint

real_llama_cpp.home()  # skips the module when llama.cpp is not built (fails in make test)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("llama_cpp")]


def _base_gguf(checkpoint: Path, out: Path) -> Path:
    src = out.parent / "hf"
    shutil.copytree(checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    config.setdefault("n_ctx", config.get("n_positions"))  # llama.cpp's GPT-2 reads n_ctx
    (src / "config.json").write_text(json.dumps(config))
    real_llama_cpp.convert([("convert_hf_to_gguf.py", [str(src), "--outfile", str(out),
                                                        "--outtype", "f32"])])
    return out


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
    np.testing.assert_allclose(real_llama_cpp.logits(model, ids), plain, atol=tol, rtol=0)
    assert np.abs(expected - plain).max() > 0.1
    np.testing.assert_allclose(real_llama_cpp.logits(model, ids, tmp_path / "a.gguf"), expected,
                               atol=tol, rtol=0)
