"""Weights written by a second process while the graph is traced (loraformat/export/prewrite.py).

The export written this way must be the export written in-process (which
``tests/test_export_stream.py`` holds to an independent in-memory export): the same nodes, the
same initializers in the same order, bit for bit — for float, fp16, bf16, int4 (dense layers,
embeddings, a tied head) and LoRA-slot exports; and a wrong prediction, a failing writer or a
failing trace must cost nothing but time: same output, nothing left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_families
import tiny_models
from test_merge import PEFT_CASES, make_peft_adapter

from loraformat.export import prewrite
from loraformat.export.onnx import export_onnx
from loraformat.export.quantize import QuantOptions, transposed
from loraformat.export.slots import export_with_slots
from loraformat.interchange import open_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _shared_trace(tmp_path_factory, monkeypatch):
    """Both exports of a comparison share one trace (the graph cache, tested elsewhere): what
    differs between them is only how the weights were written."""
    monkeypatch.setenv("LORAFORMAT_CACHE", str(tmp_path_factory.getbasetemp() / "graph-cache"))


def _proto(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def assert_same_model(a: Path, b: Path) -> None:
    pa, pb = _proto(a), _proto(b)
    assert [n.SerializeToString() for n in pa.graph.node] == [
        n.SerializeToString() for n in pb.graph.node
    ]
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in pa.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in pb.graph.initializer}
    assert list(ia) == list(ib)
    for name, value in ib.items():
        assert ia[name].dtype == value.dtype and np.array_equal(ia[name], value), name


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".loraformat"))


def _adapter(base: Path, arch: str, where: Path):
    return open_adapter(make_peft_adapter(base, arch, where, **PEFT_CASES[arch]), base=base)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = tiny_models.llama(tmp_path_factory.mktemp("llama"), layers=2)
    adapter = _adapter(base, "llama", tmp_path_factory.mktemp("llama-peft") / "peft")
    return base, adapter


@pytest.mark.parametrize(
    "arch,dtype",
    [("llama", "float32"), ("gpt2", "float32"), ("bert", "float16"), ("llama", "bfloat16")],
)
def test_prewritten_export_equals_the_in_process_one(tiny_checkpoint, tmp_path, arch, dtype):
    base = tiny_checkpoint(arch)
    adapter = _adapter(base, arch, tmp_path / "peft")
    runs = {}
    for use in (True, False):
        runs[use] = export_onnx(base, tmp_path / f"{use}.onnx", adapters=[adapter], dtype=dtype,
                                external_data=True, prewrite=use)
    assert runs[True].prewritten and not runs[False].prewritten
    assert_same_model(runs[True].path, runs[False].path)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "quant",
    [QuantOptions(), QuantOptions(symmetric=True, lm_head=True, embeddings=True),
     QuantOptions(bits=8, block_size=64)],
    ids=["int4", "int4-sym-head-embeddings", "int8"],
)
def test_prewritten_quantized_export_equals_the_in_process_one(llama, tmp_path, quant):
    base, adapter = llama
    dtype = f"int{quant.bits}"
    runs = {
        use: export_onnx(base, tmp_path / f"{use}.onnx", adapters=[adapter], dtype=dtype,
                         quant=quant, external_data=True, prewrite=use)
        for use in (True, False)
    }
    assert runs[True].prewritten and runs[True].quantized_layers == runs[False].quantized_layers
    assert_same_model(runs[True].path, runs[False].path)


def test_tied_table_quantized_keeps_its_float_head(tmp_path):
    """Qwen2 ties its head to the embedding table: the table is written quantized for the Gather
    and float for the head's MatMul, as the graph holds it."""
    base = tiny_families.qwen2(tmp_path / "base", layers=2)
    quant = QuantOptions(embeddings=True, lm_head=True)
    runs = {
        use: export_onnx(base, tmp_path / f"{use}.onnx", dtype="int4", quant=quant,
                         external_data=True, prewrite=use)
        for use in (True, False)
    }
    assert runs[True].prewritten
    assert_same_model(runs[True].path, runs[False].path)
    names = {t.name for t in _proto(runs[True].path).graph.initializer}
    assert {"model.embed_tokens.weight", "model.embed_tokens.weight_Q4"} <= names


def test_verify_reads_the_prewritten_file(llama, tmp_path):
    base, adapter = llama
    result = export_onnx(base, tmp_path / "m.onnx", adapters=[adapter], external_data=True,
                         prewrite=True, verify_output=True)
    assert result.prewritten and result.max_abs_diff is not None
    assert result.max_abs_diff <= result.tolerance


def test_a_wrong_prediction_costs_only_time(llama, tmp_path, monkeypatch):
    """The writer is told to write a tensor the graph does not hold: its file is dropped and the
    weights are written in-process; told to skip some, the parent appends them."""
    base, adapter = llama
    reference = export_onnx(base, tmp_path / "ref.onnx", adapters=[adapter], external_data=True,
                            prewrite=False)
    plan_jobs = prewrite.plan_jobs

    def extra(checkpoint, dtypes, layers, quant):
        name = next(n for n in checkpoint.names() if n.endswith("q_proj.weight"))
        return [*plan_jobs(checkpoint, dtypes, layers, quant),
                prewrite.Job(name, "dense", "float32")]

    monkeypatch.setattr(prewrite, "plan_jobs", extra)
    over = export_onnx(base, tmp_path / "over.onnx", adapters=[adapter], external_data=True,
                       prewrite=True)
    assert not over.prewritten
    assert_same_model(over.path, reference.path)

    monkeypatch.setattr(prewrite, "plan_jobs",
                        lambda *a: plan_jobs(*a)[::2])  # every other tensor only
    under = export_onnx(base, tmp_path / "under.onnx", adapters=[adapter], external_data=True,
                        prewrite=True)
    assert under.prewritten
    assert_same_model(under.path, reference.path)
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_falls_back(llama, tmp_path, monkeypatch):
    base, adapter = llama
    plan_jobs = prewrite.plan_jobs
    monkeypatch.setattr(prewrite, "plan_jobs", lambda *a: [
        *plan_jobs(*a), prewrite.Job("no.such.tensor", "float", "float32")
    ])
    started = []
    spawn = prewrite.spawn
    monkeypatch.setattr(prewrite, "spawn", lambda *a: started.append(spawn(*a)) or started[-1])
    result = export_onnx(base, tmp_path / "m.onnx", adapters=[adapter], external_data=True,
                         prewrite=True)
    assert not result.prewritten
    assert "the writer exited 1" in started[0].failure and "no.such.tensor" in started[0].failure
    monkeypatch.undo()
    monkeypatch.setenv("LORAFORMAT_CACHE", "off")
    reference = export_onnx(base, tmp_path / "ref.onnx", adapters=[adapter], external_data=True,
                            prewrite=False)
    assert_same_model(result.path, reference.path)
    assert _leftovers(tmp_path) == []


def test_a_failing_trace_stops_the_writer_and_leaves_nothing(llama, tmp_path, monkeypatch):
    import loraformat.export.onnx as export_module

    base, adapter = llama
    started = []
    spawn = prewrite.spawn
    monkeypatch.setattr(prewrite, "spawn", lambda *a: started.append(spawn(*a)) or started[-1])

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr(export_module, "build_graph", broken)
    with pytest.raises(RuntimeError, match="the exporter broke"):
        export_onnx(base, tmp_path / "m.onnx", adapters=[adapter], external_data=True,
                    prewrite=True)
    assert started and started[0].process.poll() is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_auto_mode_and_the_switch(llama, tmp_path, monkeypatch):
    """By default the writer runs for exports with external data of PREWRITE_MIN_BYTES or more;
    LORAFORMAT_PREWRITE=off turns it off."""
    base, _ = llama
    assert not export_onnx(base, tmp_path / "small.onnx", external_data=True).prewritten
    monkeypatch.setattr(prewrite, "PREWRITE_MIN_BYTES", 0)
    assert export_onnx(base, tmp_path / "auto.onnx", external_data=True).prewritten
    assert not export_onnx(base, tmp_path / "inline.onnx", external_data=False).prewritten
    monkeypatch.setenv("LORAFORMAT_PREWRITE", "off")
    assert not export_onnx(base, tmp_path / "off.onnx", external_data=True).prewritten
    assert_same_model(tmp_path / "auto.onnx", tmp_path / "off.onnx")


def test_lora_slot_export_prewritten(llama, tmp_path, monkeypatch):
    import loraformat.export.onnx as export_module

    base, _ = llama
    # external data for a tiny model (the slot export is export_onnx's pipeline)
    monkeypatch.setattr(export_module, "STREAM_EXTERNAL_BYTES", 0)
    runs = {use: export_with_slots(base, tmp_path / f"{use}.onnx", with_past=True, prewrite=use)
            for use in (True, False)}
    assert runs[True].prewritten and not runs[False].prewritten
    assert runs[True].external_data is not None
    assert_same_model(runs[True].path, runs[False].path)


@pytest.mark.parametrize("shape", [(1, 7), (129, 5), (300, 257), (128, 128)])
def test_blocked_transpose_is_the_transpose(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = transposed(w)
    assert got.flags.c_contiguous and np.array_equal(got, w.T)


@pytest.mark.parametrize("source", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("target", ["float32", "float16", "bfloat16"])
def test_blocked_cast_is_the_one_shot_cast(monkeypatch, source, target):
    """merged_array casts in blocks (bounded memory); every bit as one cast through fp32."""
    import ml_dtypes

    from loraformat.export import stream

    def dtype(name: str) -> np.dtype:
        return np.dtype(getattr(ml_dtypes, name, None) or name)

    values = (np.random.default_rng(0).standard_normal(10_007) * 300).astype(np.float32)
    values[:4] = [np.inf, -np.inf, np.nan, 1e-9]
    stored = values.astype(dtype(source))
    monkeypatch.setattr(stream, "CAST_BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(stream, "read_tensor", lambda checkpoint, name: stored.copy())
    with np.errstate(over="ignore"):
        got = stream.merged_array(None, "w", None, dtype(target))
        want = stored if source == target else stored.astype(np.float32).astype(dtype(target))
    assert got.dtype == dtype(target) and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("how", ["kernel", "no copy_file_range", "it fails", "fails midway"])
def test_copy_tensor_writes_merged_arrays_bytes(monkeypatch, tmp_path, how):
    """The writer copies unmerged tensors through in blocks (the kernel's copy where the dtype
    stays): the bytes merged_array's value would be, at the file's position, in every dtype
    pair, and whatever copy_file_range does."""
    import ml_dtypes
    import onnx_ir as ir

    from loraformat.checkpoint import Checkpoint
    from loraformat.export import stream
    from loraformat.format.safetensors_io import write_safetensors

    values = (np.random.default_rng(1).standard_normal((97, 31)) * 300).astype(np.float32)
    values[0, :4] = [np.inf, -np.inf, np.nan, 1e-9]
    sources = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
               "float64": np.float64}
    with np.errstate(over="ignore"):
        write_safetensors(tmp_path / "model.safetensors",
                          {f"w.{k}": values.astype(v) for k, v in sources.items()})
    real = os.copy_file_range
    if how == "no copy_file_range":
        monkeypatch.delattr(os, "copy_file_range")
    elif how == "it fails":
        monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError()))
    elif how == "fails midway":
        calls = []

        def midway(src, dst, count, offset_src, offset_dst):
            calls.append(count)
            if len(calls) > 2:
                raise OSError("not on this filesystem")
            return real(src, dst, 100, offset_src, offset_dst)

        monkeypatch.setattr(os, "copy_file_range", midway)
    monkeypatch.setattr(stream, "CAST_BLOCK_ELEMENTS", 500)
    with Checkpoint(tmp_path / "model.safetensors") as checkpoint:
        for source in sources:
            for target in ("float32", "float16", "bfloat16"):
                dtype = np.dtype(sources[target])
                with open(tmp_path / "out", "wb") as out:
                    out.write(b"head")
                    stream.copy_tensor(checkpoint, f"w.{source}", dtype, out)
                    out.write(b"tail")
                with np.errstate(over="ignore"):
                    want = ir.Tensor(stream.merged_array(checkpoint, f"w.{source}", None, dtype))
                got = (tmp_path / "out").read_bytes()
                assert got == b"head" + want.tobytes() + b"tail", (source, target)


def test_a_writer_given_no_work_exits_quietly(tmp_path):
    from loraformat.onnx_io import Staging

    staging = Staging(tmp_path / "m.onnx")
    writer = prewrite.spawn(staging)
    assert writer is not None
    writer.process.stdin.close()  # what the parent's exit does when it writes in-process
    assert writer.process.wait(timeout=60) == 0
    assert writer.errors.read_text() == ""
    staging.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_loraformat_folder_in_the_working_directory_does_not_stand_in(llama, tmp_path,
                                                                        monkeypatch):
    """The writer imports the loraformat the parent runs, not one in the working directory
    (`python -m` would put it first on sys.path)."""
    base, _ = llama
    shadow = tmp_path / "cwd" / "loraformat"
    (shadow / "export").mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise SystemExit("the wrong loraformat")\n')
    monkeypatch.chdir(tmp_path / "cwd")
    started = []
    spawn = prewrite.spawn
    monkeypatch.setattr(prewrite, "spawn", lambda *a: started.append(spawn(*a)) or started[-1])
    result = export_onnx(base, tmp_path / "m.onnx", external_data=True, prewrite=True)
    assert result.prewritten, started[0].failure
