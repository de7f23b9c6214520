"""An ``.onnx_adapter`` written by loraformat, activated with plain onnxruntime
(``LoraAdapter`` + ``RunOptions.add_active_adapter``) on the hot-swappable graph that
``export_with_slots`` makes, gives the merged model's outputs (transformers on the checkpoint
``merge_checkpoint`` writes), 1e-4 in fp32. The adapters carry what the conversion must get
right: scales ≠ 1 folded into B (alpha/r and rsLoRA), mixed ranks, and for GPT-2 a fused c_attn
layer adapted on q and v only (out_rows expanded to zero rows)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch

from loraformat import interchange
from loraformat.base import open_base
from loraformat.export.slots import export_with_slots
from loraformat.format.adapter import Adapter, LoraLayer
from loraformat.merge import merge_checkpoint

pytestmark = pytest.mark.slow


def _adapter(base, scaling, seed):
    rng = np.random.default_rng(seed)
    layers = {}
    linear = [p for p, layer in base.layers.items() if layer.kind == "linear" and "." in p]
    for i, path in enumerate(linear[::2]):
        dense = base.layers[path]
        out_rows = None
        if path.endswith("attn.c_attn"):
            d = dense.out_features // 3
            out_rows = [(0, d), (2 * d, 3 * d)]
        rows = dense.out_features if out_rows is None else 2 * (dense.out_features // 3)
        rank = 2 + i % 3
        layers[path] = LoraLayer(
            A=(rng.standard_normal((rank, dense.in_features)) * 0.3).astype(np.float32),
            B=(rng.standard_normal((rows, rank)) * 0.3).astype(np.float32),
            alpha=float(3 + i), in_features=dense.in_features, out_features=dense.out_features,
            out_rows=out_rows,
        )
    return Adapter.from_layers(base.architecture, layers, scaling=scaling)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def graph(request, tiny_checkpoint, tmp_path_factory):
    arch = request.param
    base_path = tiny_checkpoint(arch)
    root = tmp_path_factory.mktemp(f"{arch}-ort")
    result = export_with_slots(base_path, root / "base.onnx")
    return arch, base_path, root, result


@pytest.mark.parametrize("scaling", ["alpha/r", "alpha/sqrt(r)"])
def test_activated_onnx_adapter_equals_merged_model(graph, scaling):
    import onnxruntime as ort

    arch, base_path, root, result = graph
    with open_base(base_path) as base:
        adapter = _adapter(base, scaling, seed=len(scaling))
    adapter.save(root / f"lf-{len(scaling)}")
    out = root / f"task-{len(scaling)}.onnx_adapter"
    report = interchange.convert(root / f"lf-{len(scaling)}", out, base=base_path)
    assert report.target_format == "onnx_adapter" and report.layers == len(adapter.specs)

    merged = root / f"merged-{len(scaling)}"
    merge_checkpoint(base_path, [root / f"lf-{len(scaling)}"], merged)
    ids = np.random.default_rng(5).integers(0, 96, (2, 7)).astype(np.int64)
    with torch.no_grad():
        model = tiny_models.load_transformers(merged, arch)
        expected = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
        plain = tiny_models.load_transformers(base_path, arch)(
            torch.from_numpy(ids), use_cache=False
        ).logits.numpy()

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(out))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    got = session.run(None, tiny_models.feed(session, ids), options)[0]
    assert np.abs(expected - plain).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # With no adapter active, the same session is the base model.
    np.testing.assert_allclose(session.run(None, tiny_models.feed(session, ids))[0], plain,
                               atol=1e-4, rtol=0)
