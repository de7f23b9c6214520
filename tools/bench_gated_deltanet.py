"""Benchmark: the gated delta rule as loraformat exports it (one ONNX ``Scan``) against ONNX
Runtime's fused ``com.microsoft`` ``LinearAttention`` (what ONNX Runtime GenAI's model builder
emits for Qwen3.5), one linear-attention layer's recurrence at Qwen3.5-9B's sizes, on the CPU.

    .venv/bin/python tools/bench_gated_deltanet.py [--prefill 256] [--repeat 5] [--threads 2]

Both graphs get the same inputs (q, k L2-normalised, q scaled by 1/sqrt(d_k), 16 key heads of
128, 32 value heads of 128, decay ≤ 0, beta in (0, 1), a random starting state) and must agree
(their outputs and final states to 1e-4 of the outputs' scale) before anything is timed: the
fused op is an independent implementation of the same recurrence. Timed, interleaved, median of
``--repeat``: a prefill of ``--prefill`` positions and a single-position decode step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_K, N_V, D_K, D_V = 16, 32, 128, 128


def scan_graph(path: Path) -> None:
    """The plugin's recurrence (plugins/_gated_deltanet.py) exported as loraformat exports it."""
    import torch
    from loraformat_plugins._gated_deltanet import gated_delta_rule

    class Recurrence(torch.nn.Module):
        def forward(self, q, k, v, g, beta, state):
            rep = N_V // N_K
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
            return gated_delta_rule(q, k, v, g, beta, state)

    b, s = 1, 3
    args = (torch.randn(b, s, N_K, D_K), torch.randn(b, s, N_K, D_K), torch.randn(b, s, N_V, D_V),
            -torch.rand(b, s, N_V), torch.rand(b, s, N_V), torch.randn(b, N_V, D_K, D_V))
    names = ["q", "k", "v", "g", "beta", "state"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names[:5]}
    axes.update(state={0: "batch"}, out={0: "batch", 1: "sequence"}, final={0: "batch"})
    program = torch.onnx.export(Recurrence(), args, input_names=names,
                                output_names=["out", "final"], dynamic_axes=axes, dynamo=True,
                                opset_version=18, verbose=False)
    program.save(str(path))


def fused_graph(path: Path) -> None:
    """ONNX Runtime's LinearAttention, laid out as GenAI's builder calls it (3-D packed)."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    node = helper.make_node(
        "LinearAttention", ["q", "k", "v", "state", "g", "beta"], ["out", "final"],
        domain="com.microsoft", q_num_heads=N_K, kv_num_heads=N_V,
        update_rule="gated_delta", scale=1.0,
    )
    graph = helper.make_graph(
        [node], "fused",
        [value("q", ["b", "s", N_K * D_K]), value("k", ["b", "s", N_K * D_K]),
         value("v", ["b", "s", N_V * D_V]), value("state", ["b", N_V, D_K, D_V]),
         value("g", ["b", "s", N_V]), value("beta", ["b", "s", N_V])],
        [value("out", ["b", "s", N_V * D_V]), value("final", ["b", N_V, D_K, D_V])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                     helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path)


def inputs(seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = unit(rng.standard_normal((1, seq, N_K, D_K))) * D_K**-0.5
    k = unit(rng.standard_normal((1, seq, N_K, D_K)))
    return {
        "q": q.astype(np.float32), "k": k.astype(np.float32),
        "v": rng.standard_normal((1, seq, N_V, D_V)).astype(np.float32),
        "g": -rng.uniform(0.01, 0.5, (1, seq, N_V)).astype(np.float32),
        "beta": rng.uniform(0.05, 0.95, (1, seq, N_V)).astype(np.float32),
        "state": (0.1 * rng.standard_normal((1, N_V, D_K, D_V))).astype(np.float32),
    }


def packed(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fused op's 3-D layout of the same inputs."""
    out = dict(feed)
    for name in ("q", "k", "v"):
        out[name] = np.ascontiguousarray(feed[name].reshape(1, feed[name].shape[1], -1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        scan_path, fused_path = Path(tmp) / "scan.onnx", Path(tmp) / "fused.onnx"
        scan_graph(scan_path)
        fused_graph(fused_path)
        sessions = {
            "scan": onnxruntime.InferenceSession(str(scan_path), options,
                                                 providers=["CPUExecutionProvider"]),
            "fused": onnxruntime.InferenceSession(str(fused_path), options,
                                                  providers=["CPUExecutionProvider"]),
        }
    rng = np.random.default_rng(0)
    feeds = {"prefill": inputs(args.prefill, rng), "decode": inputs(1, rng)}
    for case, feed in feeds.items():
        scan_out, scan_final = sessions["scan"].run(None, feed)
        fused_out, fused_final = sessions["fused"].run(None, packed(feed))
        scale = np.abs(scan_out).max()
        np.testing.assert_allclose(scan_out.reshape(fused_out.shape), fused_out,
                                   atol=1e-4 * scale, rtol=0, err_msg=case)
        np.testing.assert_allclose(scan_final, fused_final, atol=1e-4 * np.abs(scan_final).max(),
                                   rtol=0, err_msg=case)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for case, feed in feeds.items():
            for name, session in sessions.items():
                fed = feed if name == "scan" else packed(feed)
                start = time.perf_counter()
                session.run(None, fed)
                times.setdefault((case, name), []).append(time.perf_counter() - start)
    print(f"one Qwen3.5-9B linear-attention recurrence ({N_K}×{D_K} key, {N_V}×{D_V} value "
          f"heads), CPU, {args.threads} threads, median of {args.repeat}; outputs agree")
    for case in feeds:
        scan = statistics.median(times[(case, "scan")])
        fused = statistics.median(times[(case, "fused")])
        what = f"prefill {args.prefill}" if case == "prefill" else "decode 1"
        print(f"  {what:>12}: Scan {scan * 1e3:8.2f} ms, LinearAttention {fused * 1e3:8.2f} ms "
              f"({scan / fused:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
