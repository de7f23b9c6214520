"""An MLX-LM adapter written by loraformat, loaded by real mlx-lm (``load_adapters``), gives the
outputs of the loraformat-merged checkpoint loaded by mlx-lm — both sides in MLX, so MLX's own
numerics (its llama3 rope differs from transformers' by ~3e-4 on the tiny base) cancel out.
Covers mixed ranks (zero-padded), a folded scale, DoRA, and GPT-2's Conv1D layers.

Needs ``mlx`` (CPU wheels exist for Linux: ``pip install "mlx[cpu]" mlx-lm``); skipped without.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from loraformat import interchange
from loraformat.base import open_base
from loraformat.format.safetensors_io import SafetensorsFile, write_safetensors
from loraformat.merge import merge_checkpoint

pytest.importorskip("mlx_lm")
import mlx.core as mx
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load_model
from test_interchange import linear_paths, make_adapter

pytestmark = pytest.mark.slow


def _mlx_loadable(checkpoint, out):
    """mlx-lm's GPT-2 expects the hub's bare names (``h.0…``), not ``transformer.h.0…``, and the
    old ``n_ctx`` config key: a copy with both."""
    out.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config.setdefault("n_ctx", config.get("n_positions"))
    (out / "config.json").write_text(json.dumps(config))
    with SafetensorsFile(checkpoint / "model.safetensors") as st:
        arrays = {name.removeprefix("transformer."): np.array(st.numpy(name)) for name in st}
    write_safetensors(out / "model.safetensors", arrays, {"format": "pt"})
    return out


CASES = {
    "llama-plain": ("llama", lambda p: {}),
    "llama-ranks-fold": ("llama", lambda p: {p[0]: {"rank": 2, "alpha": 4.0},
                                             p[1]: {"alpha": 20.0}}),
    "llama-dora": ("llama", lambda p: {q: {"dora": True} for q in p}),
    "gpt2": ("gpt2", lambda p: {p[0]: {"rank": 2}, p[2]: {"alpha": 3.0}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mlx_lm_loads_adapter_like_merged_model(tiny_checkpoint, tmp_path, case):
    arch, per_layer = CASES[case]
    base_path = tiny_checkpoint(arch)
    with open_base(base_path) as base:
        paths = linear_paths(base)
        adapter = make_adapter(base, paths, per_layer=per_layer(paths))
    adapter.save(tmp_path / "lf")
    interchange.convert(tmp_path / "lf", tmp_path / "mlx", to="mlx", base=base_path)
    merge_checkpoint(base_path, [tmp_path / "lf"], tmp_path / "merged")
    shutil.copy(base_path / "config.json", tmp_path / "merged" / "config.json")
    ids = mx.array(np.random.default_rng(0).integers(0, 96, (2, 7)))

    merged, _ = load_model(_mlx_loadable(tmp_path / "merged", tmp_path / "merged-mlx"))
    expected = np.array(merged(ids))
    model, _ = load_model(_mlx_loadable(base_path, tmp_path / "base-mlx"))
    plain = np.array(model(ids))
    model = load_adapters(model, str(tmp_path / "mlx"))
    got = np.array(model(ids))
    assert np.abs(expected - plain).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
