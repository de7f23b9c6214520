"""``--verify`` at scale: the torch reference reads each weight from the checkpoint when an op
uses it (``stream.weights_on_demand``), instead of loading the whole module next to ONNX Runtime.

The reference here is the in-memory one built independently: every merged tensor in memory
(``merged_tensors``), the plugin's module constructed with them, and the same comparison run on
the written file. Both must give the same figures — the same weights and inputs make the same
numbers — while the streamed check never holds more than a few tensors at once.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

import numpy as np
import pytest
import tiny_families
from test_merge import PEFT_CASES, make_peft_adapter

import loraformat.export.stream as stream
from loraformat.architecture import ExportOptions
from loraformat.base import open_base
from loraformat.export.decoder import (
    decoder_check_inputs,
    export_decoder,
    tensors_vocab,
    verify_decoder,
)
from loraformat.export.onnx import compare, export_onnx, merged_tensors, open_plan, random_inputs
from loraformat.interchange import open_adapter

pytestmark = pytest.mark.slow

FAMILY_PEFT = dict(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory) -> Path:
    """Tied embeddings (Qwen2.5's layout): the logits read ``embed_tokens.weight`` outside the
    embedding's own forward."""
    return tiny_families.qwen2(tmp_path_factory.mktemp("qwen2-base"))


def _base(arch: str, tiny_checkpoint, qwen2_base: Path) -> Path:
    return qwen2_base if arch == "qwen2" else tiny_checkpoint(arch)


def _adapter(base: Path, arch: str, tmp_path: Path):
    if arch == "qwen2":
        peft = tiny_families.peft_adapter(base, "qwen2", tmp_path / "peft", **FAMILY_PEFT)
    else:
        peft = make_peft_adapter(base, arch, tmp_path / "peft", **PEFT_CASES[arch])
    return open_adapter(peft, base=base)


@contextlib.contextmanager
def _in_memory(base: Path, adapter, options: ExportOptions):
    """The export module with every merged weight loaded (the former --verify reference)."""
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(open_base(base))
        plan = open_plan(stack, model, [adapter])
        tensors = merged_tensors(model, plan, "float32")
        yield model, model.arch.export_model(model.info, tensors, options)


@contextlib.contextmanager
def _live_weights():
    """Count the checkpoint tensors the streamed reference holds at once (peak bytes/tensors)."""
    live: dict[int, int] = {}
    peak = {"bytes": 0, "tensors": 0, "reads": 0}
    original = stream.merged_array

    def tracked(*args, **kwargs):
        array = original(*args, **kwargs)
        key = id(array)
        live[key] = array.nbytes
        weakref.finalize(array, live.pop, key, None)
        peak["reads"] += 1
        peak["bytes"] = max(peak["bytes"], sum(live.values()))
        peak["tensors"] = max(peak["tensors"], len(live))
        return array

    stream.merged_array = tracked
    try:
        yield peak
    finally:
        stream.merged_array = original


def _weight_bytes(base: Path) -> tuple[int, int]:
    with open_base(base) as model:
        sizes = [model.checkpoint.info(n).nbytes for n in model.checkpoint.names()]
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama", "vit", "qwen2"])
def test_streamed_verify_matches_the_in_memory_reference(tiny_checkpoint, qwen2_base, tmp_path,
                                                         arch):
    base = _base(arch, tiny_checkpoint, qwen2_base)
    adapter = _adapter(base, arch, tmp_path)
    out = tmp_path / "m.onnx"
    with _live_weights() as peak:
        result = export_onnx(base, out, adapters=[adapter], verify_output=True)
    assert out.is_file() and result.max_abs_diff is not None and result.tolerance is not None
    assert result.max_abs_diff <= result.tolerance  # the verdict: accepted

    with _in_memory(base, adapter, ExportOptions()) as (model, exported):
        ref = compare(out, exported, random_inputs(exported, model.config))
    assert result.verify_provider == ref.provider
    assert result.max_abs_diff == pytest.approx(ref.max_abs_diff, rel=1e-6, abs=1e-9)
    assert result.cosine == pytest.approx(ref.cosine, abs=1e-9)
    # the figure is a real comparison, not zero: ONNX Runtime's kernels round differently
    assert ref.max_abs_diff > 0

    # weights were read per op and released: never the model at once
    total, largest = _weight_bytes(base)
    assert peak["reads"] > 0
    assert peak["bytes"] <= 3 * largest < total, (peak, total, largest)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_decoder_verify_matches_the_in_memory_reference(tiny_checkpoint, qwen2_base,
                                                                 tmp_path, arch):
    base = _base(arch, tiny_checkpoint, qwen2_base)
    adapter = _adapter(base, arch, tmp_path)
    out = tmp_path / "d.onnx"
    with _live_weights() as peak:
        result = export_decoder(base, out, adapters=[adapter], verify_output=True)
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance

    with _in_memory(base, adapter, ExportOptions(with_past=True)) as (model, exported):
        checks = decoder_check_inputs(exported, tensors_vocab(exported, model.config))
        ref = verify_decoder(out, exported, checks)
    assert result.max_abs_diff == pytest.approx(ref.max_abs_diff, rel=1e-6, abs=1e-9)
    assert result.cosine == pytest.approx(ref.cosine, abs=1e-9)
    total, largest = _weight_bytes(base)
    assert 0 < peak["bytes"] <= 3 * largest < total


def test_int4_verify_cosine_matches_the_fp32_in_memory_reference(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama")
    adapter = _adapter(base, "llama", tmp_path)
    out = tmp_path / "q.onnx"
    result = export_onnx(base, out, adapters=[adapter], dtype="int4", verify_output=True)
    assert result.cosine is not None and result.min_cosine <= result.cosine < 1
    with _in_memory(base, adapter, ExportOptions()) as (model, exported):
        ref = compare(out, exported, random_inputs(exported, model.config))
    assert result.cosine == pytest.approx(ref.cosine, abs=1e-9)
    assert result.max_abs_diff == pytest.approx(ref.max_abs_diff, rel=1e-6)


def test_on_demand_reference_equals_loaded_weights_for_a_tied_head(qwen2_base, tmp_path):
    """The tied head reads the embedding in the root module's forward, outside any hook a
    per-module mechanism would place: the on-demand forward must still equal the loaded one,
    and the module keeps its placeholders afterwards."""
    import torch

    adapter = _adapter(qwen2_base, "qwen2", tmp_path)
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(open_base(qwen2_base))
        plan = open_plan(stack, model, [adapter])
        tensors = stream.placeholder_tensors(model.checkpoint, torch.float32)
        exported = stream.build_weightless(
            lambda: model.arch.export_model(model.info, tensors, ExportOptions()), tensors
        )
        assert "lm_head.weight" not in model.checkpoint  # tied
        inputs = random_inputs(exported, model.config)
        with torch.no_grad():
            placeholder_logits = exported.module(**inputs)
            with stream.weights_on_demand(exported.module, model.checkpoint, plan,
                                          torch.float32):
                streamed = exported.module(**inputs)
            assert all(p.stride() == (0,) * p.dim() for p in exported.module.parameters())
            stream.load_real_weights(exported.module, model.checkpoint, plan, torch.float32)
            loaded = exported.module(**inputs)
    assert torch.equal(streamed, loaded)
    assert not torch.allclose(streamed, placeholder_logits)  # the weights did matter
    np.testing.assert_array_less(0, streamed.abs().max().item())
