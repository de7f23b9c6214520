"""The graph cache (loraformat/export/graph_cache.py): a second export of a base reuses the traced
graph and writes the same model; anything the trace depends on changes the key; a broken entry is
traced anew."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_models
from test_export_repeat import canonical
from test_merge import PEFT_CASES, make_peft_adapter

from loraformat.export import graph_cache
from loraformat.export.onnx import export_onnx
from loraformat.interchange import open_adapter

pytestmark = pytest.mark.slow


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORMAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "graphs"


def _logits(path, ids):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, tiny_models.feed(session, ids))[0]


def test_the_second_export_of_a_base_uses_the_cached_graph(cache, tmp_path, monkeypatch):
    base = tiny_models.llama(tmp_path / "base", layers=4)
    adapter = open_adapter(
        make_peft_adapter(base, "llama", tmp_path / "peft", **PEFT_CASES["llama"]), base=base
    )
    first = export_onnx(base, tmp_path / "plain.onnx")
    assert "cache" not in first.traced and len(list(cache.glob("*.onnx"))) == 1
    # another adapter on the same base: the same trace, weights from the checkpoint + adapter
    merged = export_onnx(base, tmp_path / "merged.onnx", adapters=[adapter], verify_output=True)
    assert merged.traced.endswith("the trace from the graph cache")
    assert merged.max_abs_diff is not None and merged.max_abs_diff <= merged.tolerance
    assert next(cache.glob("*.onnx")).stat().st_size < 1_000_000  # the graph, no weights
    # the same model as an export that traces: the cache only ever saves the tracing
    monkeypatch.setenv("LORAFORMAT_CACHE", "off")
    traced = tmp_path / "traced.onnx"
    export_onnx(base, traced, adapters=[adapter])
    assert canonical(tmp_path / "merged.onnx") == canonical(traced)
    ids = np.array([[3, 9, 27, 81, 5]], dtype=np.int64)
    assert np.array_equal(_logits(tmp_path / "merged.onnx", ids), _logits(traced, ids))
    want = {t.name: onnx.numpy_helper.to_array(t)
            for t in onnx.load(str(traced)).graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t)
           for t in onnx.load(str(tmp_path / "merged.onnx")).graph.initializer}
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_what_the_trace_depends_on_is_in_the_key(cache, tmp_path):
    base = tiny_models.llama(tmp_path / "base", layers=3)
    export_onnx(base, tmp_path / "a.onnx")
    export_onnx(base, tmp_path / "b.onnx", dtype="float16")  # another dtype: another graph
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = 0.5  # a constant in the graph, large enough to change the output
    (base / "config.json").write_text(json.dumps(config))
    result = export_onnx(base, tmp_path / "c.onnx", verify_output=True)  # vs torch: new eps
    assert "cache" not in result.traced and result.max_abs_diff <= result.tolerance
    assert len(list(cache.glob("*.onnx"))) == 3


def test_a_broken_entry_is_traced_again(cache, tmp_path):
    base = tiny_models.llama(tmp_path / "base", layers=3)
    export_onnx(base, tmp_path / "a.onnx")
    entry = next(cache.glob("*.onnx"))
    entry.write_bytes(b"not a model")
    again = export_onnx(base, tmp_path / "b.onnx", verify_output=True)
    assert "cache" not in again.traced and again.max_abs_diff <= again.tolerance
    assert entry.stat().st_size > 1000  # replaced by a good entry
    third = export_onnx(base, tmp_path / "c.onnx")
    assert third.traced.endswith("the trace from the graph cache")


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORMAT_CACHE", "off")
    assert graph_cache.cache_dir() is None
    monkeypatch.setenv("LORAFORMAT_CACHE", str(tmp_path))
    assert graph_cache.cache_dir() == tmp_path / "graphs"
    monkeypatch.delenv("LORAFORMAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert graph_cache.cache_dir() == tmp_path / "xdg" / "loraformat" / "graphs"
