"""A GGUF model merged by loraformat, run by real llama.cpp, gives transformers' logits on PEFT's
merge. The base is converted by llama.cpp's own ``convert_hf_to_gguf.py`` (F32), so names,
q/k row order and metadata are llama.cpp's, not this project's.

Skipped unless ``llama_cpp`` and ``LORAFORMAT_LLAMA_CPP_SRC`` are available (see
test_interchange_llama_cpp.py, whose helpers this reuses); not run where this was written.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from test_interchange_llama_cpp import _base_gguf, _logits  # skips this module likewise

from loraformat.merge.gguf import merge_gguf

pytestmark = pytest.mark.slow


def test_llama_cpp_runs_merged_gguf_like_peft_merge(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    base = tiny_checkpoint("llama")
    adapter = tiny_models.peft_adapter(base, "llama", tmp_path / "peft", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merged = PeftModel.from_pretrained(tiny_models.load_transformers(base, "llama"),
                                       adapter).merge_and_unload()
    ids = np.random.default_rng(0).integers(0, 96, 7)
    with torch.no_grad():
        expected = merged(torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy()
        plain = tiny_models.load_transformers(base, "llama")(
            torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy()
    assert np.abs(expected - plain).max() > 0.1
    model = _base_gguf(base, tmp_path / "base.gguf")
    merge_gguf(model, [adapter], tmp_path / "merged.gguf")
    np.testing.assert_allclose(_logits(tmp_path / "merged.gguf", None, ids), expected, atol=1e-4,
                               rtol=0)
