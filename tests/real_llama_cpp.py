"""Real llama.cpp for the tests: its converters, ``llama-export-lora`` and logits from ``libllama``
through its C API (ctypes), from the build ``tools/build_llama_cpp.py`` leaves in its cache.

Outside ``make test`` a missing build skips the tests that need it (one line saying how to build
it); ``make test`` builds it first and sets ``LORAFORMAT_REQUIRE_LLAMA_CPP=1``, so there a missing
build fails them.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import build_llama_cpp


def home() -> Path:
    """The llama.cpp build directory (its ``src`` and ``build``), or skip/fail without one."""
    cache = build_llama_cpp.cache_dir()
    if (cache / "built").is_file():
        return cache
    reason = f"llama.cpp is not built in {cache} (python tools/build_llama_cpp.py; make test does)"
    if os.environ.get("LORAFORMAT_REQUIRE_LLAMA_CPP"):
        pytest.fail(reason)
    pytest.skip(reason, allow_module_level=True)


# One Python process runs every conversion: llama.cpp's converter scripts as their own __main__.
# The tiny checkpoints have no tokenizer: every model class writes "no_vocab" instead.
_DRIVER = """
import json, runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion
exec(sys.argv[3])

def no_vocab(self):
    self.gguf_writer.add_tokenizer_model("no_vocab")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

find = conversion.get_model_class
def get_model_class(*args, **kwargs):
    found = find(*args, **kwargs)
    for cls in found.__mro__:
        if "set_vocab" in vars(cls):
            cls.set_vocab = no_vocab
    return found
conversion.get_model_class = get_model_class
for script, argv in json.loads(sys.argv[2]):
    sys.argv = [script, *argv]
    runpy.run_path(src + "/" + script, run_name="__main__")
"""


def convert(jobs: list[tuple[str, list[str]]], setup: str = "") -> None:
    """Run llama.cpp's converters (``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py``, each
    with its command line) in one process, after ``setup`` (Python run once ``conversion`` is
    imported: a converter setting its command line cannot reach)."""
    src = home() / "src"
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(src), json.dumps(jobs), setup], capture_output=True,
        text=True,
    )
    if done.returncode:
        raise AssertionError(f"llama.cpp's converter failed:\n{done.stderr[-4000:]}")


def hf_to_gguf(model: Path, out: Path, *args: str) -> tuple[str, list[str]]:
    """The :func:`convert` job writing the transformers checkpoint ``model`` as an f32 GGUF."""
    return ("convert_hf_to_gguf.py", [str(model), "--outfile", str(out), "--outtype", "f32",
                                      *args])


def lora_to_gguf(peft: Path, base: Path, out: Path) -> tuple[str, list[str]]:
    """The :func:`convert` job writing the PEFT adapter ``peft`` of ``base`` as an f32 GGUF
    LoRA."""
    return ("convert_lora_to_gguf.py", [str(peft), "--base", str(base), "--outfile", str(out),
                                        "--outtype", "f32"])


def write_vocab(model: Path, size: int) -> None:
    """A word-level ``tokenizer.json`` of ``size`` tokens in ``model``: the tiny checkpoints have
    none, and llama.cpp's converters (Gemma's) count the vocabulary there."""
    (model / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {f"t{i}": i for i in range(size)}}, "added_tokens": []}))


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 (dequantized), numpy shape."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    return {t.name: dequantize(np.asarray(t.data), t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape.tolist())]).astype(np.float32) for t in reader.tensors}


def lora_deltas(path: Path) -> dict[str, np.ndarray]:
    """A GGUF LoRA's ΔW per llama.cpp weight name: alpha/rank · B·A, as llama.cpp applies it
    (without ``adapter.lora.alpha`` llama.cpp's scale is 1: its converter writes none for some
    architectures, e.g. mistral3)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("adapter.lora.alpha")
    alpha = float(field.contents()) if field is not None else None
    tensors = gguf_tensors(path)
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            stem = name.removesuffix(".lora_a")
            a, b = tensors[name], tensors[stem + ".lora_b"]
            out[stem] = (alpha / a.shape[0] if alpha else 1.0) * (b @ a)
    return out


def export_lora(base: Path, lora: Path, out: Path) -> Path:
    """``llama-export-lora -m BASE --lora LORA -o OUT``."""
    tool = home() / "build" / "bin" / "llama-export-lora"
    done = subprocess.run([str(tool), "-m", str(base), "--lora", str(lora), "-o", str(out)],
                          capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"llama-export-lora failed:\n{done.stdout[-2000:]}{done.stderr}")
    return out


# -- the C API (include/llama.h of build 11434) ---------------------------------------------------

_p, _i32, _u32, _f32, _bool = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32, ctypes.c_float, \
    ctypes.c_bool


class _ModelParams(ctypes.Structure):
    _fields_ = [("devices", _p), ("tensor_buft_overrides", _p), ("n_gpu_layers", _i32),
                ("split_mode", _i32), ("load_mode", _i32), ("lazy_mode", _i32),
                ("main_gpu", _i32), ("tensor_split", _p), ("progress_callback", _p),
                ("progress_callback_user_data", _p), ("kv_overrides", _p),
                ("vocab_only", _bool), ("check_tensors", _bool), ("use_extra_bufts", _bool),
                ("no_host", _bool), ("no_alloc", _bool), ("load_mtp", _bool)]


class _ContextParams(ctypes.Structure):
    _fields_ = [("n_ctx", _u32), ("n_batch", _u32), ("n_ubatch", _u32), ("n_seq_max", _u32),
                ("n_rs_seq", _u32), ("n_outputs_max", _u32), ("n_outputs_max_per_seq", _u32),
                ("n_threads", _i32), ("n_threads_batch", _i32), ("ctx_type", _i32),
                ("rope_scaling_type", _i32), ("pooling_type", _i32), ("attention_type", _i32),
                ("flash_attn_type", _i32), ("rope_freq_base", _f32), ("rope_freq_scale", _f32),
                ("yarn_ext_factor", _f32), ("yarn_attn_factor", _f32), ("yarn_beta_fast", _f32),
                ("yarn_beta_slow", _f32), ("yarn_orig_ctx", _u32), ("defrag_thold", _f32),
                ("cb_eval", _p), ("cb_eval_user_data", _p), ("type_k", _i32), ("type_v", _i32),
                ("abort_callback", _p), ("abort_callback_data", _p), ("embeddings", _bool),
                ("offload_kqv", _bool), ("no_perf", _bool), ("op_offload", _bool),
                ("swa_full", _bool), ("kv_unified", _bool), ("samplers", _p),
                ("n_samplers", ctypes.c_size_t), ("ctx_other", _p)]


class _Batch(ctypes.Structure):
    _fields_ = [("n_tokens", _i32), ("token", ctypes.POINTER(_i32)), ("embd", _p),
                ("pos", ctypes.POINTER(_i32)), ("n_seq_id", ctypes.POINTER(_i32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(_i32))),
                ("logits", ctypes.POINTER(ctypes.c_int8))]


_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, _p)
_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(str(home() / "build" / "bin" / "libllama.so"))
    signatures = {
        "llama_backend_init": ([], None),
        "llama_log_set": ([_LOG, _p], None),
        "llama_model_default_params": ([], _ModelParams),
        "llama_context_default_params": ([], _ContextParams),
        "llama_model_load_from_file": ([ctypes.c_char_p, _ModelParams], _p),
        "llama_init_from_model": ([_p, _ContextParams], _p),
        "llama_adapter_lora_init": ([_p, ctypes.c_char_p], _p),
        "llama_set_adapters_lora": ([_p, ctypes.POINTER(_p), ctypes.c_size_t,
                                     ctypes.POINTER(_f32)], _i32),
        "llama_model_get_vocab": ([_p], _p),
        "llama_vocab_n_tokens": ([_p], _i32),
        "llama_batch_init": ([_i32, _i32, _i32], _Batch),
        "llama_batch_free": ([_Batch], None),
        "llama_decode": ([_p, _Batch], _i32),
        "llama_get_logits_ith": ([_p, _i32], ctypes.POINTER(_f32)),
        "llama_free": ([_p], None),
        "llama_model_free": ([_p], None),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    lib._quiet = _LOG(lambda level, text, data: None)  # kept alive with the library
    lib.llama_log_set(lib._quiet, None)
    lib.llama_backend_init()
    _lib = lib
    return lib


def logits(model: Path, ids: np.ndarray, lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one batch, F32 KV cache), with the GGUF
    LoRA ``lora`` applied at run time (scale 1) if given."""
    lib = _library()
    model_params = lib.llama_model_default_params()
    model_params.use_extra_bufts = False  # CPU repacking of Q8_0 crashes on these tiny rows
    handle = lib.llama_model_load_from_file(str(model).encode(), model_params)
    assert handle, f"llama.cpp cannot load {model}"
    try:
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 64
        params.type_k = params.type_v = 0  # GGML_TYPE_F32: the default f16 cache costs ~1e-3
        params.flash_attn_type = 0  # disabled: flash attention on the CPU rounds through f16
        params.n_threads = params.n_threads_batch = 1
        ctx = lib.llama_init_from_model(handle, params)
        assert ctx, "llama.cpp cannot make a context"
        try:
            if lora is not None:
                adapter = lib.llama_adapter_lora_init(handle, str(lora).encode())
                assert adapter, f"llama.cpp cannot load the LoRA {lora}"
                assert lib.llama_set_adapters_lora(
                    ctx, (_p * 1)(adapter), 1, (_f32 * 1)(1.0)) == 0
            batch = lib.llama_batch_init(len(ids), 0, 1)
            try:
                batch.n_tokens = len(ids)
                for i, token in enumerate(ids):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                assert lib.llama_decode(ctx, batch) == 0, "llama_decode failed"
                vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(handle))
                return np.array([np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i),
                                                       (vocab,)) for i in range(len(ids))])
            finally:
                lib.llama_batch_free(batch)
        finally:
            lib.llama_free(ctx)
    finally:
        lib.llama_model_free(handle)
