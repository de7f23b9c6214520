"""Kill tests: commands killed with SIGKILL at random moments leave no half-written output.

``loraformat merge`` (into a sharded checkpoint directory and into ``.onnx``), ``convert``,
``stack`` and ``reduce`` are started over and over and killed with SIGKILL at a seeded random
moment. Afterwards, for every run:

- the output is either absent or complete and valid: a directory loads with
  :class:`loraformat.checkpoint.Checkpoint` and every tensor equals a reference run's; an ``.onnx``
  passes ``onnx.checker`` and its initializers and nodes equal the reference's; an adapter loads
  and validates and its tensors equal the reference's;
- nothing else is left beside the output except temporaries whose names carry ``.lf-tmp-``
  (SIGKILL allows no cleanup; spec/ERRORS.md says they are safe to delete);
- the inputs' sha256 are unchanged.

Half of the kill moments are uniform over the command's runtime (measured first with one
uncontested run), the other half uniform over its write phase (from the first appearance of a
``.lf-tmp-`` temporary to the end), where a non-atomic writer would be caught. The test checks
that some kills did land during a write, so it cannot pass by killing only during start-up.

To keep many short kills cheap, the commands run in children forked from a "fork server"
subprocess that has already imported loraformat, torch and onnx: each child runs the CLI's
``main(argv)`` exactly as the ``loraformat`` executable does, minus interpreter start-up. The
server kills its own child by pid (through a pidfd when available), so the signal can never reach
a reused pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from loraformat.atomic import TMP_MARKER

SEED = 20260801

# The fork server kills through a pidfd (Linux ≥ 5.3), so a signal can never hit a reused pid.
pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs os.pidfd_open")

# -- the fork server ----------------------------------------------------------------------------

_SERVER = r"""
import importlib, json, os, select, signal, sys, time
for name in sys.argv[1:]:
    importlib.import_module(name)
from loraformat.cli import main

requests = os.fdopen(os.dup(0), "r", buffering=1)
reply = os.fdopen(os.dup(1), "w", buffering=1)
while True:
    line = requests.readline()
    if not line:
        break
    if line.strip() == "kill":  # a kill that arrived after its command had ended
        continue
    request = json.loads(line)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(request["cwd"])
            try:
                main(request["argv"])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    reply.write(json.dumps({"pid": pid}) + "\n")
    delay = request.get("kill_after")
    killed = False
    while True:
        wait = None if delay is None else max(0.0, start + delay - time.monotonic())
        ready = select.select([pidfd, requests], [], [], wait)[0]
        if pidfd in ready:
            break  # ended on its own
        if requests in ready:
            assert requests.readline().strip() == "kill"
        # The child is not reaped yet, so the pidfd (and the pid) still name it.
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        killed = True
        break
    _, status, usage = os.wait4(pid, 0)
    os.close(pidfd)
    reply.write(json.dumps({
        "status": status, "seconds": time.monotonic() - start, "killed": killed,
        "cpu": usage.ru_utime + usage.ru_stime,
    }) + "\n")
"""


class ForkServer:
    """Runs ``loraformat <argv>`` in forked children of a pre-imported Python process."""

    def __init__(self, preload: list[str], log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self.runs = 0
        self._pending = b""  # reply bytes read but not yet returned as lines

    def _reply(self, timeout: float | None = None) -> dict | None:
        """The server's next reply line, or None when none is complete within ``timeout``.

        Read from the raw pipe, not the text wrapper: a wrapper's readline may buffer the next
        reply too (a command that ends at once sends both), and a select() on the pipe would
        then wait forever for bytes already read."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("the fork server exited")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def run(
        self,
        argv: list[str],
        cwd: Path,
        kill_after: float | None = None,
        watch: Path | None = None,
        kill_after_temp: float | None = None,
    ) -> dict:
        """Run one command; with ``kill_after``, SIGKILL it that many seconds after the fork;
        with ``kill_after_temp``, that many seconds after a new ``.lf-tmp-`` entry appears in
        ``watch`` (i.e. during its write).

        With ``watch``, report the first moment a new ``.lf-tmp-`` entry appeared there
        (``tmp_seen``, seconds after the fork, or None).
        """
        self.runs += 1
        log = self.log_dir / f"run-{self.runs}.log"
        before = set(os.listdir(watch)) if watch is not None else set()
        request = {"argv": argv, "cwd": str(cwd), "log": str(log), "kill_after": kill_after}
        self._send(json.dumps(request))
        started = self._reply()
        assert started is not None
        t0 = time.monotonic()
        tmp_seen = kill_at = None
        done = None
        if watch is not None:
            while (done := self._reply(timeout=0.001)) is None:
                now = time.monotonic()
                if tmp_seen is None and any(
                    n.startswith(TMP_MARKER) and n not in before for n in os.listdir(watch)
                ):
                    tmp_seen = now - t0
                    if kill_after_temp is not None:
                        kill_at = now + kill_after_temp
                if kill_at is not None and now >= kill_at:
                    self._send("kill")
                    kill_at = float("inf")
        if done is None:
            done = self._reply()
        assert done is not None
        text = log.read_text(errors="replace") if log.exists() else ""  # killed before opening
        done.update(pid=started["pid"], tmp_seen=tmp_seen, log=text)
        done["exit_code"] = -9 if done["killed"] else os.waitstatus_to_exitcode(done["status"])
        return done

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- inputs and checks --------------------------------------------------------------------------


def sha256_tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (and of single files)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def random_adapter(
    base: Path, out: Path, rank: int = 4, seed: int = 0, every_layer: bool = False
) -> Path:
    """A loraformat adapter with random A and B on the base's default targets (or every layer)."""
    from loraformat import LoraLayer
    from loraformat.base import open_base
    from loraformat.format.adapter import Adapter

    rng = np.random.default_rng(seed)
    with open_base(base) as model:
        paths = list(model.layers) if every_layer else model.default_target_paths()
        layers = {}
        for path in paths:
            dense = model.layers[path]
            if dense.kind != "linear":
                continue
            layers[path] = LoraLayer(
                rng.standard_normal((rank, dense.in_features)).astype(np.float32),
                (0.01 * rng.standard_normal((dense.out_features, rank))).astype(np.float32),
                2.0 * rank, dense.in_features, dense.out_features,
            )
        adapter = Adapter.from_layers(
            model.architecture, layers, fingerprint=model.checkpoint.fingerprint()
        )
    return adapter.save(out)


def gpt2_sharded(out: Path) -> Path:
    """A GPT-2-shaped checkpoint of ~5 MB in 7 shards: the write phase takes a while."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=512, n_positions=64, n_embd=128, n_layer=6, n_head=4, bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(out, max_shard_size="1MB")
    return out


def gpt2_wide_vocab(out: Path) -> Path:
    """A one-layer GPT-2 with a 16k vocabulary: export time as for any tiny model, but ~5 MB of
    weights, so writing the .onnx is a window a kill can land in."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=16384, n_positions=64, n_embd=64, n_layer=1, n_head=4, bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    return out


def leftovers_ok(folder: Path, outputs: set[str]) -> tuple[list[str], list[str]]:
    """Entries of ``folder``: (temporaries, anything neither an output nor a temporary)."""
    temps, strays = [], []
    for name in os.listdir(folder):
        if name.startswith(TMP_MARKER):
            temps.append(name)
        elif name not in outputs:
            strays.append(name)
    return temps, strays


def kill_plan(
    rng: random.Random, n: int, runtime: float, write_start: float | None
) -> list[dict[str, float]]:
    """Half the kills at a moment uniform over the whole runtime, half uniform over the write
    phase, timed from the moment the run's own temporary appears (robust to load)."""
    write = runtime - write_start if write_start is not None else 0.0
    plan = [{"kill_after": rng.uniform(0.0, runtime)} for _ in range(n - n // 2)]
    plan += [{"kill_after_temp": rng.uniform(0.0, write)} for _ in range(n // 2)]
    rng.shuffle(plan)
    return plan


def kill_loop(
    server: ForkServer,
    work: Path,
    make_argv: Callable[[str], list[str]],
    out_name: Callable[[int], str],
    check_complete: Callable[[Path], None],
    n: int,
    seed: int,
    prepare: Callable[[Path], None] | None = None,
    warm_run: bool = True,
) -> Counter:
    """Measure one uncontested run, then ``n`` killed runs; check every outcome."""
    reference = work / out_name(-1)
    measured = server.run(make_argv(reference.name), work, watch=work)
    assert measured["exit_code"] == 0, measured["log"]
    check_complete(reference)
    if warm_run:  # time a second run (the first pays for cold caches); discard its output
        warm = work / ("warm-" + reference.name)
        measured = server.run(make_argv(warm.name), work, watch=work)
        assert measured["exit_code"] == 0, measured["log"]
        shutil.rmtree(warm) if warm.is_dir() else warm.unlink()
    runtime, write_start = measured["seconds"], measured["tmp_seen"]
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    outputs = {reference.name, reference.name + ".data"}
    for i, kill in enumerate(kill_plan(rng, n, runtime, write_start)):
        out = work / out_name(i)
        if prepare is not None and i % 4 == 3:
            prepare(out)  # a previous complete output, replaced with --overwrite
        before = set(os.listdir(work))
        run = server.run(make_argv(out.name) + (["--overwrite"] if out.exists() else []),
                         work, watch=work, **kill)
        outputs |= {out.name, out.name + ".data"}
        temps, strays = leftovers_ok(work, outputs)
        assert not strays, f"run {i}: unexpected files {strays}"
        new_temps = [t for t in temps if t not in before]
        if run["killed"]:
            outcomes["killed"] += 1
            if run["tmp_seen"] is not None:
                outcomes["killed after its write began"] += 1
            if new_temps:
                outcomes["killed mid-write (temporary left)"] += 1
        else:
            assert run["exit_code"] == 0, run["log"]
            outcomes["finished before the kill"] += 1
            assert not new_temps, f"run {i} finished but left {new_temps}"
        if out.exists():
            outcomes["output present"] += 1
            check_complete(out)
        else:
            outcomes["output absent"] += 1
    print(f"\n{' '.join(make_argv('OUT')[:1])}: runtime {runtime:.2f}s, write phase from "
          f"{write_start if write_start is None else round(write_start, 3)}s; {n} runs: "
          f"{dict(outcomes)}")
    return outcomes


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logs = tmp_path_factory.mktemp("kill-logs")
    # Everything the commands import, so each forked run pays only for its own work (the torch
    # exporter's lazy imports are ~30% of a tiny export).
    srv = ForkServer(
        ["loraformat.cli.merge_cmd", "loraformat.merge.checkpoint", "loraformat.export.onnx",
         "loraformat.cli.convert_cmd", "loraformat.interchange", "loraformat.cli.algebra_cmd",
         "loraformat.cli.export_cmd", "loraformat.architecture.modules", "torch", "onnx",
         "onnx_ir", "onnxruntime", "onnxscript.optimizer", "onnxscript.rewriter",
         "onnxscript.function_libs.torch_lib.ops", "torch.onnx._internal.exporter._core",
         "torch._functorch.aot_autograd", "torch._dynamo", "torch.export",
         "torch.fx.experimental.proxy_tensor", "torch._subclasses.fake_tensor"],
        logs,
    )
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-sharded")
    base = gpt2_sharded(root / "base")
    adapter = random_adapter(base, root / "adapter", rank=8, every_layer=True)
    return base, adapter


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_merge_to_directory(server, sharded, tmp_path):
    from loraformat.checkpoint import Checkpoint

    base, adapter = sharded
    hashes = sha256_tree(base, adapter)
    work = tmp_path / "out"
    work.mkdir()
    reference: dict[str, np.ndarray] = {}

    def check(out: Path) -> None:
        with Checkpoint(out) as ckpt:
            if not reference:
                reference.update({name: ckpt.numpy(name).copy() for name in ckpt.names()})
                with Checkpoint(base) as original:
                    changed = [n for n in reference
                               if not np.array_equal(reference[n], original.numpy(n))]
                assert len(changed) >= 20  # the merge did change the weights
                return
            assert sorted(ckpt.names()) == sorted(reference)
            for name, value in reference.items():
                np.testing.assert_array_equal(ckpt.numpy(name), value, err_msg=name)
        assert sorted(os.listdir(out)) == sorted(os.listdir(work / "ref"))

    def prepare(out: Path) -> None:
        shutil.copytree(work / "ref", out)

    outcomes = kill_loop(
        server, work,
        lambda name: ["merge", str(base), str(adapter), "-o", name],
        lambda i: "ref" if i < 0 else f"merged-{i}",
        check, n=24, seed=SEED, prepare=prepare,
    )
    assert outcomes["killed mid-write (temporary left)"] >= 1, outcomes
    assert sha256_tree(base, adapter) == hashes


@pytest.mark.slow
def test_kill_merge_to_onnx(server, tmp_path):
    import onnx
    from onnx import numpy_helper

    base = gpt2_wide_vocab(tmp_path / "base")
    adapter = random_adapter(base, tmp_path / "adapter")
    hashes = sha256_tree(base, adapter)
    work = tmp_path / "out"
    work.mkdir()
    reference: dict = {}

    def check(out: Path) -> None:
        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        nodes = [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
        if not reference:
            reference.update(inits=inits, nodes=nodes)
            return
        assert nodes == reference["nodes"]
        assert sorted(inits) == sorted(reference["inits"])
        for name, value in reference["inits"].items():
            np.testing.assert_array_equal(inits[name], value, err_msg=name)

    outcomes = kill_loop(
        server, work,
        lambda name: ["merge", str(base), str(adapter), "-o", name],
        lambda i: "ref.onnx" if i < 0 else f"merged-{i}.onnx",
        check, n=20, seed=SEED + 1, prepare=lambda out: shutil.copy(work / "ref.onnx", out),
        warm_run=False,  # seconds of tracing dwarf any cache effect
    )
    # The write is the last ~50 ms of a ~3 s run: under load a kill aimed at it may land just
    # after the rename, so require kills after the write began (usually several mid-write).
    assert outcomes["killed after its write began"] >= 1, outcomes
    assert sha256_tree(base, adapter) == hashes


def test_kill_merge_to_single_file(server, tiny_checkpoint, tmp_path):
    """A single-file base merged into one ``.safetensors`` file, killed; a complete output also
    has the permissions a plain ``open()`` would give it (not the temporary's 0600)."""
    from loraformat.checkpoint import Checkpoint

    base = tiny_checkpoint("gpt2")
    adapter = random_adapter(base, tmp_path / "adapter", seed=2)
    hashes = sha256_tree(base, adapter)
    work = tmp_path / "out"
    work.mkdir()
    reference: dict[str, np.ndarray] = {}
    umask = os.umask(0)
    os.umask(umask)

    def check(out: Path) -> None:
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask
        with Checkpoint(out) as ckpt:
            tensors = {name: ckpt.numpy(name).copy() for name in ckpt.names()}
        if not reference:
            reference.update(tensors)
            return
        assert sorted(tensors) == sorted(reference)
        for name, value in reference.items():
            np.testing.assert_array_equal(tensors[name], value, err_msg=name)

    kill_loop(
        server, work,
        lambda name: ["merge", str(base), str(adapter), "-o", name],
        lambda i: "ref.safetensors" if i < 0 else f"merged-{i}.safetensors",
        check, n=8, seed=SEED + 5,
        prepare=lambda out: shutil.copy(work / "ref.safetensors", out),
    )
    assert sha256_tree(base, adapter) == hashes


@pytest.mark.slow
def test_kill_merge_onnx_surgery(server, tiny_checkpoint, tmp_path):
    """An ONNX base merged into an ONNX output (initializer surgery, no torch), killed."""
    import onnx
    from onnx import numpy_helper

    base = tiny_checkpoint("gpt2")
    adapter = random_adapter(base, tmp_path / "adapter", seed=1)
    onnx_base = tmp_path / "base.onnx"
    exported = server.run(["export", str(base), "-o", str(onnx_base)], tmp_path)
    assert exported["exit_code"] == 0, exported["log"]
    hashes = sha256_tree(onnx_base, adapter)
    work = tmp_path / "out"
    work.mkdir()
    reference: dict = {}

    def check(out: Path) -> None:
        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        if not reference:
            reference.update(inits)
            original = {t.name: numpy_helper.to_array(t)
                        for t in onnx.load(str(onnx_base)).graph.initializer}
            assert sum(not np.array_equal(v, original[k]) for k, v in inits.items()) == 2
            return
        assert sorted(inits) == sorted(reference)
        for name, value in reference.items():
            np.testing.assert_array_equal(inits[name], value, err_msg=name)

    kill_loop(
        server, work,
        lambda name: ["merge", str(onnx_base), str(adapter), "-o", name],
        lambda i: "ref.onnx" if i < 0 else f"merged-{i}.onnx",
        check, n=20, seed=SEED + 4, prepare=lambda out: shutil.copy(work / "ref.onnx", out),
    )
    assert sha256_tree(onnx_base, adapter) == hashes


def _adapter_checker(reference: dict) -> Callable[[Path], None]:
    from loraformat.format.adapter import load, validate

    def check(out: Path) -> None:
        assert validate(out) == []
        with load(out) as adapter:
            tensors = {name: np.array(adapter.tensors[name]) for name in adapter.tensors}
        if not reference:
            reference.update(tensors)
            return
        assert sorted(tensors) == sorted(reference)
        for name, value in reference.items():
            np.testing.assert_array_equal(tensors[name], value, err_msg=name)

    return check


@pytest.mark.parametrize("command", ["stack", "reduce"])
def test_kill_algebra_writing_an_adapter(server, sharded, tmp_path, command):
    _, adapter = sharded
    hashes = sha256_tree(adapter)
    work = tmp_path / "out"
    work.mkdir()
    argv = {
        "stack": lambda name: ["stack", str(adapter), str(adapter), "-w", "0.5", "-w", "2",
                               "-o", name],
        "reduce": lambda name: ["reduce", str(adapter), "--rank", "3", "-o", name],
    }[command]
    kill_loop(server, work, argv, lambda i: "ref" if i < 0 else f"{command}-{i}",
              _adapter_checker({}), n=8, seed=SEED + 2,
              prepare=lambda out: shutil.copytree(work / "ref", out))
    assert sha256_tree(adapter) == hashes


def test_kill_convert(server, sharded, tmp_path):
    """loraformat → PEFT directory, killed; the PEFT output is absent or equal to the reference."""
    from loraformat.interchange.peft import read_peft

    base, adapter = sharded
    hashes = sha256_tree(adapter)
    work = tmp_path / "out"
    work.mkdir()
    reference: dict = {}

    def check(out: Path) -> None:
        assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
        with read_peft(out, base=base) as converted:
            tensors = {name: np.array(converted.tensors[name]) for name in converted.tensors}
        if not reference:
            reference.update(tensors)
            return
        assert sorted(tensors) == sorted(reference)
        for name, value in reference.items():
            np.testing.assert_array_equal(tensors[name], value, err_msg=name)

    kill_loop(server, work,
              lambda name: ["convert", str(adapter), "-o", name, "--to", "peft"],
              lambda i: "ref" if i < 0 else f"peft-{i}", check, n=8, seed=SEED + 3,
              prepare=lambda out: shutil.copytree(work / "ref", out))
    assert sha256_tree(adapter) == hashes
