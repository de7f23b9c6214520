"""Benchmark: ``combine --method svd`` against PEFT's ``add_weighted_adapter(..., "svd")``.

Two rank-16 adapters on all 7 projections of an 8-layer, hidden-2048 LLaMA-shaped model (TinyLlama
block shape: 32 heads, 4 KV heads, intermediate 5632; a small vocabulary because embeddings are not
adapted), combined to rank 16 with weights 0.6 / 0.4. Both are run in the same process on the same
adapter tensors; each result's ΔW is compared per layer with the exact weighted sum (float64).

Also times ``extract`` on one 4096×4096 layer (randomized SVD, rank 16) against a dense full SVD.

    .venv/bin/python tools/bench_combine.py [--skip-peft] [--skip-extract-baseline]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loraformat import Adapter, LoraLayer, load
from loraformat.algebra import combine
from loraformat.algebra.extract import extract_layer

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 8, 2048, 5632, 32, 4
RANK, ALPHA, WEIGHTS = 16, 32, (0.6, 0.4)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes() -> dict[str, tuple[int, int]]:
    """Layer path → (in, out), math orientation."""
    kv = HIDDEN // HEADS * KV_HEADS
    dims = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (HIDDEN, kv),
        "self_attn.v_proj": (HIDDEN, kv),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
        "mlp.up_proj": (HIDDEN, INTERMEDIATE),
        "mlp.down_proj": (INTERMEDIATE, HIDDEN),
    }
    return {f"model.layers.{i}.{k}": v for i in range(LAYERS) for k, v in dims.items()}


def make_adapter(seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    layers = {}
    for path, (in_f, out_f) in shapes().items():
        a = (rng.standard_normal((RANK, in_f)) / math.sqrt(in_f)).astype(np.float32)
        b = (rng.standard_normal((out_f, RANK)) * 0.01).astype(np.float32)
        layers[path] = LoraLayer(a, b, ALPHA, in_f, out_f)
    return Adapter.from_layers("llama", layers)


def exact_delta(adapters: list[Adapter], path: str) -> np.ndarray:
    total = None
    for adapter, w in zip(adapters, WEIGHTS, strict=True):
        term = w * adapter.delta(path, np.float64)
        total = term if total is None else total + term
    return total


def errors(deltas: dict[str, np.ndarray], adapters: list[Adapter]) -> tuple[float, float]:
    """(max per-layer relative error, global relative error) against the exact weighted sum."""
    worst, num, den = 0.0, 0.0, 0.0
    for path, delta in deltas.items():
        exact = exact_delta(adapters, path)
        diff = float(np.linalg.norm(delta - exact))
        norm = float(np.linalg.norm(exact))
        worst = max(worst, diff / norm)
        num, den = num + diff**2, den + norm**2
    return worst, math.sqrt(num / den)


def run_ours(adapters: list[Adapter], repeats: int = 3) -> tuple[list[float], float, Adapter, list]:
    """In-memory combine times (the first is cold), then one load + combine + save from files."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result, report = combine(adapters, list(WEIGHTS), "svd", rank=RANK)
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, adapter in enumerate(adapters):
            paths.append(Path(tmp) / f"in{i}.safetensors")
            adapter.save(paths[-1])
        start = time.perf_counter()
        loaded = [load(p) for p in paths]
        combined, _ = combine(loaded, list(WEIGHTS), "svd", rank=RANK)
        combined.save(Path(tmp) / "out.safetensors")
        with_files = time.perf_counter() - start
        for adapter in loaded:
            adapter.close()
    return times, with_files, result, report


def ours_single_thread() -> str:
    """This project's timings in a child process with OPENBLAS_NUM_THREADS=1.

    The factored route is many small tall-skinny products; on a busy 2-core machine OpenBLAS's
    spinning worker threads cost more than they bring.
    """
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--ours-only"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def run_peft(adapters: list[Adapter]) -> tuple[float, dict[str, np.ndarray]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")  # base weights are never read by the combination
    lora = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(PROJECTIONS), init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora, adapter_name="a")
    peft_model.add_adapter("b", lora)
    modules = {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, PeftLoraLayer)
    }
    assert set(modules) == set(shapes()), "PEFT module names differ from the adapter paths"
    with torch.no_grad():
        for name, adapter in zip(("a", "b"), adapters, strict=True):
            for path, module in modules.items():
                layer = adapter.layer(path)
                module.lora_A[name].weight.copy_(torch.from_numpy(np.array(layer.A)))
                module.lora_B[name].weight.copy_(torch.from_numpy(np.array(layer.B)))
    start = time.perf_counter()
    peft_model.add_weighted_adapter(
        ["a", "b"], list(WEIGHTS), "svd", combination_type="svd", svd_rank=RANK
    )
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        deltas = {p: m.get_delta_weight("svd").double().numpy() for p, m in modules.items()}
    return elapsed, deltas


def bench_extract(baseline: bool) -> None:
    rng = np.random.default_rng(0)
    n = 4096
    delta = (
        (rng.standard_normal((n, 16)) @ rng.standard_normal((16, n))) * 1e-3
        + 1e-6 * rng.standard_normal((n, n))
    ).astype(np.float32)
    extract_layer(delta[:512, :512], 16, None)  # warm up BLAS
    start = time.perf_counter()
    _, _, error = extract_layer(delta, 16, None)
    fast = time.perf_counter() - start
    start = time.perf_counter()
    a_e, _, error_e = extract_layer(delta, None, 0.99)
    energy_time = time.perf_counter() - start
    print(f"extract 4096×4096, rank 16:     {fast:8.3f} s   rel. error {error:.3e}")
    print(
        f"extract 4096×4096, energy 0.99: {energy_time:8.3f} s   rank {a_e.shape[0]}, "
        f"rel. error {error_e:.3e}"
    )
    if baseline:
        start = time.perf_counter()
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        dense = time.perf_counter() - start
        best = (u[:, :16] * s[:16]) @ vt[:16]
        best_error = float(np.linalg.norm(delta - best) / np.linalg.norm(delta))
        print(
            f"dense full SVD (numpy) baseline: {dense:8.3f} s   rel. error {best_error:.3e}"
            f"   → {dense / fast:.0f}× faster"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-peft", action="store_true", help="only time this project")
    parser.add_argument("--skip-extract-baseline", action="store_true")
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    adapters = [make_adapter(1), make_adapter(2)]
    times, with_files, result, report = run_ours(adapters)
    if args.ours_only:
        print(
            f"cold {times[0]:.3f} s, best {min(times):.3f} s, load+combine+save {with_files:.3f} s"
        )
        return
    print(
        f"{len(shapes())} layers, 2 adapters of rank {RANK} → rank {RANK}, weights {WEIGHTS}; "
        f"BLAS threads: OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    ours_max, ours_global = errors({p: result.delta(p, np.float64) for p in shapes()}, adapters)
    reported = max(row.relative_error for row in report)
    best = min(times)
    print(
        f"loraformat combine svd, in memory:  cold {times[0]:7.3f} s, best of {len(times)} "
        f"{best:7.3f} s"
    )
    print(f"loraformat load + combine + save:        {with_files:7.3f} s")
    print(f"loraformat, 1 BLAS thread (child process): {ours_single_thread()}")
    print(
        f"  rel. error vs exact Σwᵢ·ΔWᵢ: max/layer {ours_max:.4e}, global {ours_global:.4e} "
        f"(reported max {reported:.4e})"
    )
    if not args.skip_peft:
        peft_time, peft_deltas = run_peft(adapters)
        peft_max, peft_global = errors(peft_deltas, adapters)
        print(f"PEFT add_weighted_adapter(combination_type='svd'): {peft_time:8.3f} s")
        print(f"  rel. error vs exact Σwᵢ·ΔWᵢ: max/layer {peft_max:.4e}, global {peft_global:.4e}")
        print(
            f"speed-up: {peft_time / times[0]:.0f}× (cold), {peft_time / best:.0f}× (best), "
            f"{peft_time / with_files:.0f}× (with file I/O); "
            f"global error ours/PEFT: {ours_global / peft_global:.6f}"
        )
    bench_extract(not args.skip_extract_baseline)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
