"""Many adapters on one base: switching per request (LoRA slots) vs reloading a merged model.

    .venv/bin/python tools/bench_switch.py [--hidden 256 --layers 4 --vocab 50257 --rank 8
                                            --adapters 10 --batch 1 --seq 64 --requests 200]

Builds, locally and in one run: a GPT-2-shaped checkpoint (random weights, transformers), N
random loraformat adapters (rank r on every c_attn/c_proj/c_fc/mlp.c_proj), the LoRA-slot graph
(``export_with_slots``) and, for each adapter, the merged graph (``export_onnx`` of the base,
then ``merge_onnx`` initializer surgery: the node list of the plain base, W' = W + scale·B·A).
Then measures:

1. time per switch: ``Session.run`` round-robin over the N adapters (the adapter changes every
   request) vs a new ``InferenceSession`` of the merged graph per task (load + first request);
2. memory held (RSS over the process's baseline, each strategy in a fresh subprocess): slot graph
   with N adapters loaded; one merged model at a time (reloading); all N merged models resident;
3. per-request latency: slot graph with no adapter, slot graph with one adapter active, merged
   graph (the price of switching).

Prints a table and the ratios; checks that slot+adapter outputs equal the merged outputs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No busy-waiting between runs: with several sessions in one process (all merged models
    # resident) spinning thread pools would fight over the cores. Same setting for every strategy.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# -- building ------------------------------------------------------------------------------------


def build(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import loraformat
    from loraformat.base import open_base
    from loraformat.export.onnx import export_onnx
    from loraformat.export.slots import export_with_slots
    from loraformat.merge.onnx_surgery import merge_onnx

    base_dir = work / "base"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(128, args.seq),
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=max(1, args.hidden // 64),
        bos_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 1,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(base_dir)

    rng = np.random.default_rng(1)
    adapters = []
    with open_base(base_dir) as base:
        targets = [p for p, layer in base.layers.items() if p.endswith(MODULES)]
        for i in range(args.adapters):
            layers = {}
            for path in targets:
                layer = base.layers[path]
                layers[path] = loraformat.LoraLayer(
                    A=(rng.standard_normal((args.rank, layer.in_features)) * 0.05).astype(
                        np.float32
                    ),
                    B=(rng.standard_normal((layer.out_features, args.rank)) * 0.05).astype(
                        np.float32
                    ),
                    alpha=2.0 * args.rank,
                    in_features=layer.in_features,
                    out_features=layer.out_features,
                )
            adapter = loraformat.Adapter.from_layers(
                "gpt2", layers, fingerprint=base.checkpoint.fingerprint()
            )
            adapters.append(adapter.save(work / f"adapter{i}.safetensors"))

        t = time.perf_counter()
        slots = export_with_slots(base, work / "slots.onnx", targets=list(MODULES))
        export_slots_s = time.perf_counter() - t
        t = time.perf_counter()
        plain = export_onnx(base, work / "plain.onnx")
        export_plain_s = time.perf_counter() - t

    # merged graphs: `loraformat merge plain.onnx ADAPTER -o merged.onnx` (initializer surgery)
    merged = []
    t = time.perf_counter()
    for i, path in enumerate(adapters):
        out = work / f"merged{i}.onnx"
        merge_onnx(plain.path, [path], out)
        merged.append(out)
    merge_s = (time.perf_counter() - t) / len(adapters)
    return {
        "slots": str(slots.path),
        "plain": str(plain.path),
        "adapters": [str(p) for p in adapters],
        "merged": [str(p) for p in merged],
        "export_slots_s": export_slots_s,
        "export_plain_s": export_plain_s,
        "merge_per_adapter_s": merge_s,
        "size_slots": os.path.getsize(slots.path),
        "size_merged": os.path.getsize(merged[0]),
        "size_adapter": os.path.getsize(adapters[0]),
    }


# -- measurements (each in a fresh process) ------------------------------------------------------


def inputs(args: argparse.Namespace) -> dict:
    ids = np.random.default_rng(2).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}  # a decoder export's inputs


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def child_slots(files: dict, args: argparse.Namespace) -> dict:
    from loraformat.runtime import Session

    feed = inputs(args)
    before = rss_bytes()
    t = time.perf_counter()
    session = Session(files["slots"], session_options=session_options())
    open_s = time.perf_counter() - t
    names = [f"a{i}" for i in range(len(files["adapters"]))]
    load_s = []
    for name, path in zip(names, files["adapters"], strict=True):
        t = time.perf_counter()
        session.load(name, path)
        load_s.append(time.perf_counter() - t)
    for name in names:  # warm every adapter once
        session.run(feed, adapter=name)
    held = rss_bytes() - before
    check = {name: session.run(feed, adapter=name)[0] for name in names[:2]}
    np.save(Path(files["work"]) / "slot_out.npy", np.stack(list(check.values())))

    # Latency: the merged graph and the three slot modes, interleaved request by request (the
    # order rotating every round) so load drift on the machine hits all four alike.
    import onnxruntime as ort

    merged = ort.InferenceSession(
        files["merged"][0], session_options(), providers=["CPUExecutionProvider"]
    )
    order = itertools.cycle(names)
    modes = {
        "merged": lambda: merged.run(None, feed),
        "none": lambda: session.run(feed),
        "fixed": lambda: session.run(feed, adapter=names[0]),
        "switching": lambda: session.run(feed, adapter=next(order)),
    }
    for fn in modes.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in modes}
    keys = list(modes)
    for i in range(args.requests):
        for key in keys[i % 4 :] + keys[: i % 4]:
            t = time.perf_counter()
            modes[key]()
            times[key].append(time.perf_counter() - t)
    return {
        "open_s": open_s,
        "load_adapter_s": statistics.median(load_s),
        "held_bytes": held,
        **{f"{key}_s": statistics.median(values) for key, values in times.items()},
    }


def child_merged_reload(files: dict, args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    feed = inputs(args)
    before = rss_bytes()
    switch_s, first_run_s, peak_held = [], [], 0
    session = None
    for rounds in range(2):
        for i, path in enumerate(files["merged"]):
            t = time.perf_counter()
            session = None  # the previous task's model is dropped before the next loads
            session = ort.InferenceSession(
                path, session_options(), providers=["CPUExecutionProvider"]
            )
            t1 = time.perf_counter()
            out = session.run(None, feed)[0]
            t2 = time.perf_counter()
            if rounds == 1:
                switch_s.append(t2 - t)
                first_run_s.append(t2 - t1)
            if i < 2 and rounds == 0:
                np.save(Path(files["work"]) / f"merged_out{i}.npy", out)
            peak_held = max(peak_held, rss_bytes() - before)
    held = rss_bytes() - before
    n = args.requests
    for _ in range(5):
        session.run(None, feed)
    latency = timed(lambda: session.run(None, feed), n)
    return {
        "switch_s": statistics.median(switch_s),
        "first_run_s": statistics.median(first_run_s),
        "held_bytes": held,
        "peak_held_bytes": peak_held,
        "latency_s": statistics.median(latency),
    }


def child_merged_all(files: dict, args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    feed = inputs(args)
    before = rss_bytes()
    sessions = [
        ort.InferenceSession(p, session_options(), providers=["CPUExecutionProvider"])
        for p in files["merged"]
    ]
    for s in sessions:
        s.run(None, feed)
    held = rss_bytes() - before
    n = args.requests
    order = itertools.cycle(sessions)
    switching, fixed = [], []
    for _ in range(n):  # interleaved, as in child_slots
        for fn, out in (
            (lambda: next(order).run(None, feed), switching),
            (lambda: sessions[0].run(None, feed), fixed),
        ):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return {
        "held_bytes": held,
        "switching_s": statistics.median(switching),
        "fixed_s": statistics.median(fixed),
    }


def child_plain(files: dict, args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    feed = inputs(args)
    before = rss_bytes()
    session = ort.InferenceSession(
        files["plain"], session_options(), providers=["CPUExecutionProvider"]
    )
    session.run(None, feed)
    held = rss_bytes() - before
    return {"held_bytes": held}


CHILDREN = {
    "slots": child_slots,
    "merged_reload": child_merged_reload,
    "merged_all": child_merged_all,
    "plain": child_plain,
}


def run_child(name: str, files: dict, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--files", json.dumps(files)]
    for key in ("hidden", "layers", "vocab", "rank", "adapters", "batch", "seq", "requests"):
        cmd += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report --------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def ms(s: float) -> str:
    return f"{s * 1e3:9.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        files = json.loads(args.files)
        print(json.dumps(CHILDREN[args.child](files, args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        work = Path(tmp)
        print(
            f"GPT-2-shaped base: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
            f"{args.adapters} adapters of rank {args.rank} on {', '.join(MODULES)}; "
            f"request = batch {args.batch} × {args.seq} tokens; {os.cpu_count()} CPUs, "
            "CPUExecutionProvider",
            flush=True,
        )
        files = build(work, args)
        files["work"] = str(work)
        results = {name: run_child(name, files, args) for name in CHILDREN}
        slot_out = np.load(work / "slot_out.npy")
        merged_out = np.stack([np.load(work / f"merged_out{i}.npy") for i in range(2)])
        max_diff = float(np.abs(slot_out - merged_out).max())

    s, r, a, p = (results[k] for k in ("slots", "merged_reload", "merged_all", "plain"))
    print()
    print(
        f"files: slot graph {mib(files['size_slots'])}, merged graph {mib(files['size_merged'])}, "
        f"adapter {mib(files['size_adapter'])}"
    )
    print(
        f"build: slot export {files['export_slots_s']:.1f} s, plain export "
        f"{files['export_plain_s']:.1f} s, "
        f"merge into ONNX {files['merge_per_adapter_s']:.2f} s/adapter"
    )
    print(f"check: slot graph + adapter vs merged graph, max |diff| = {max_diff:.2e}")
    print()
    print("switching adapters per request                     time/switch     memory held")
    print(
        f"  slots: Session.run, adapter changes every call  {ms(s['switching_s'] - s['fixed_s'])}"
        f"   {mib(s['held_bytes'])}  ({args.adapters} adapters loaded)"
    )
    print(
        f"  merged: new InferenceSession per task (+1 run)  {ms(r['switch_s'])}   "
        f"{mib(r['held_bytes'])}  (one model at a time; peak {mib(r['peak_held_bytes']).strip()})"
    )
    print(
        f"  merged: all {args.adapters} sessions resident              "
        f"{ms(a['switching_s'] - a['fixed_s'])}   {mib(a['held_bytes'])}  "
        "(round-robin run minus same-model run)"
    )
    print(
        f"  (plain base session alone: {mib(p['held_bytes']).strip()}; one adapter load into the "
        f"Session: {ms(s['load_adapter_s']).strip()})"
    )
    print()
    print("per-request latency (median)")
    print(f"  merged graph                      {ms(s['merged_s'])}")
    base = s["merged_s"]
    print(f"  slot graph, no adapter            {ms(s['none_s'])}   ×{s['none_s'] / base:.2f}")
    print(f"  slot graph, one adapter active    {ms(s['fixed_s'])}   ×{s['fixed_s'] / base:.2f}")
    print(
        f"  slot graph, adapter switches      {ms(s['switching_s'])}   "
        f"×{s['switching_s'] / base:.2f}"
    )
    print()
    print("ratios")
    print(
        f"  reload-merged switch / slot request with switch: "
        f"{r['switch_s'] / s['switching_s']:.1f}×"
    )
    print(
        f"  memory: all merged resident / slots with {args.adapters} adapters: "
        f"{a['held_bytes'] / s['held_bytes']:.1f}×; one merged / slots: "
        f"{r['held_bytes'] / s['held_bytes']:.2f}×"
    )
    print(
        f"  latency price of slots (adapter active / merged): {s['fixed_s'] / base:.2f}×; "
        f"no adapter / merged: {s['none_s'] / base:.2f}×"
    )
    print(
        json.dumps(
            {
                "files": {k: v for k, v in files.items() if not isinstance(v, (list, str))},
                "results": results,
                "max_diff": max_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
