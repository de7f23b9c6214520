"""Write an export's weights in a second process while the first traces the graph.

A streamed export (:mod:`.stream`) has two long steps that need nothing from each other: tracing
the graph (pure Python, one core: ~6-8 s at any model size) and writing the weights (read, merge,
cast or quantize, write: proportional to the model). One after the other they cost their sum; a
thread cannot overlap them, because tracing holds the GIL and the writer needs it between every
numpy call (a writer thread was 3-4× slower: README, "Why the design is as it is"). So the
weights go to a child process (:func:`main`, run by ``sys.executable``) that writes them into
the output's staging directory (:class:`~loraformat.onnx_io.Staging`) while the parent traces:

1. **The child starts first** (:func:`spawn`), so its imports overlap the parent's (torch) and
   the export module's construction. **Before tracing**, the parent predicts the initializers the
   graph will hold: every checkpoint tensor the export module has as a parameter, in the export
   dtype — or, quantizing, the MatMulNBits / GatherBlockQuantized parts of each weight the options
   ask to quantize (:func:`~.quantize.quantized_targets`) plus the float copy of any weight also
   used otherwise — and gives the child (:meth:`Prewrite.submit`) the checkpoint's path, those
   tensors' merge operations (the adapters' factors) and the list (:class:`Job`), as JSON and
   safetensors in the staging directory (nothing is unpickled).
2. **The child** computes each tensor with the same functions the lazy initializers use
   (:func:`~.stream.merged_array`, :func:`~.quantize.dense_parts`, :func:`~.quantize.table_parts`),
   writes them one after another into the data file, fsyncs it and prints its index (name,
   dtype, shape, offset, length).
3. **After tracing** (and quantizing, and any rewrite) the parent adopts the file
   (:meth:`Prewrite.adopt`): every initializer the child wrote becomes an external tensor at its
   offset; any it did not (the prediction missed it) is appended by the parent.

The prediction is an optimisation, never a condition of correctness: if the child wrote anything
the graph does not hold, in another dtype or shape, or failed, the file is dropped and the weights
are written in this process, as before — the output is the same either way (same initializers,
same bytes; ``tests/test_export_prewrite.py``). Peak memory is the two processes' sum: the
parent's graph and the child's one tensor at a time.

``LORAFORMAT_PREWRITE=off`` turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..architecture import DenseLayer
from ..checkpoint import Checkpoint
from ..format.adapter import LoraLayer
from ..format.safetensors_io import SafetensorsFile, write_safetensors
from ..merge.plan import MergePlan, TensorOp
from ..merge.weights import Contribution
from ..onnx_io import STAGED_INLINE_BYTES, Staging
from .quantize import QuantOptions, dense_parts, quantized_targets, table_parts
from .stream import copy_tensor, merged_array, release_freed_buffers

#: Environment variable that turns the weight-writing process off (``off``/``0``).
PREWRITE_ENV = "LORAFORMAT_PREWRITE"


@dataclass(frozen=True)
class Job:
    """One checkpoint tensor and what the child writes for it.

    ``kind``: ``float`` (the merged tensor in ``dtype``), ``dense`` (MatMulNBits parts of the
    merged tensor read in ``dtype``; ``layout`` is the weight's) or ``table``
    (GatherBlockQuantized parts)."""

    name: str
    kind: str
    dtype: str
    layout: str = "out_in"


@dataclass(frozen=True)
class Written:
    """Where the child put one initializer."""

    name: str
    dtype: str  # numpy dtype name (ml_dtypes names for bfloat16/int4/uint4)
    shape: tuple[int, ...]
    offset: int
    length: int


def enabled() -> bool:
    """Whether exports may use the weight-writing process (``LORAFORMAT_PREWRITE``)."""
    return os.environ.get(PREWRITE_ENV, "").strip().lower() not in ("off", "0", "false", "no")


def plan_jobs(
    checkpoint: Checkpoint,
    dtypes: Mapping[str, np.dtype],
    layers: Mapping[str, DenseLayer],
    quant: QuantOptions | None,
) -> list[Job]:
    """The jobs for the checkpoint tensors in ``dtypes`` (name → the export dtype of each: the
    export module's parameters), in the checkpoint's file order (sequential reads)."""
    dense: dict[str, DenseLayer] = {}
    tables: dict[str, DenseLayer] = {}
    users: dict[str, int] = {}
    for layer in layers.values():
        users[layer.weight] = users.get(layer.weight, 0) + 1
    if quant is not None:
        dense_layers, table_layers = quantized_targets(layers, quant)
        # a weight shared by several layers (a tied head) has a use MatMulNBits cannot take
        dense = {lay.weight: lay for lay in dense_layers.values() if users[lay.weight] == 1}
        tables = {
            lay.weight: lay for lay in table_layers.values()
            if len(checkpoint.info(lay.weight).shape) == 2
            and checkpoint.info(lay.weight).shape[1] % quant.block_size == 0
        }
    jobs = []
    for name in sorted(dtypes, key=lambda n: (checkpoint.shard_of[n], checkpoint.info(n).begin)):
        dtype = np.dtype(dtypes[name]).name
        if name in dense:
            jobs.append(Job(name, "dense", dtype, dense[name].layout))
            continue
        if name in tables:
            jobs.append(Job(name, "table", dtype))
            if users[name] == 1:  # only the embedding reads it: no float copy stays
                continue
        jobs.append(Job(name, "float", dtype))
    return jobs


def job_tensors(
    checkpoint: Checkpoint, plan: MergePlan | None, job: Job, quant: QuantOptions | None
) -> Iterator[tuple[str, np.ndarray]]:
    """(initializer name, value) of everything ``job`` writes — the values the lazy
    initializers of :mod:`.stream` and :mod:`.quantize` evaluate to."""
    dtype = _numpy_dtype(job.dtype)
    value = merged_array(checkpoint, job.name, plan, dtype)
    if job.kind == "float":
        yield job.name, value
        return
    assert quant is not None
    parts = (dense_parts(value, job.layout, quant, dtype) if job.kind == "dense"
             else table_parts(value, quant, dtype))
    del value
    for suffix, part in parts.items():
        yield job.name + suffix, part


def _numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _op_to_json(op: TensorOp, key: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``op`` as JSON, its arrays put in ``arrays`` under names derived from ``key``: the child
    is given its work as JSON and safetensors (nothing is ever unpickled)."""

    def put(array: np.ndarray | None, name: str) -> str | None:
        if array is None:
            return None
        arrays[name] = np.ascontiguousarray(array)
        return name

    contributions = []
    for i, c in enumerate(op.contributions):
        layer, at = c.layer, f"{key}/{i}/"
        contributions.append({
            "scale": float(c.scale), "weight": float(c.weight), "sign": int(c.sign),
            "A": put(layer.A, at + "A"), "B": put(layer.B, at + "B"),
            "alpha": float(layer.alpha), "in_features": int(layer.in_features),
            "out_features": int(layer.out_features), "kind": layer.kind,
            "out_rows": [[int(a), int(b)] for a, b in layer.out_rows]
            if layer.out_rows is not None else None,
            "magnitude": put(layer.magnitude, at + "magnitude"),
            "lora_bias": put(layer.lora_bias, at + "lora_bias"),
        })
    return {"name": op.name, "kind": op.kind, "layer_path": op.layer_path, "layout": op.layout,
            "replacement": put(op.replacement, key + "/replacement"), "source": op.source,
            "contributions": contributions}


def _op_from_json(entry: dict[str, Any], arrays: SafetensorsFile) -> TensorOp:
    def get(name: str | None) -> np.ndarray | None:
        return None if name is None else np.array(arrays.numpy(name))

    contributions = [
        Contribution(
            layer=LoraLayer(
                A=get(c["A"]), B=get(c["B"]), alpha=c["alpha"], in_features=c["in_features"],
                out_features=c["out_features"], kind=c["kind"],
                out_rows=[tuple(r) for r in c["out_rows"]] if c["out_rows"] is not None
                else None,
                magnitude=get(c["magnitude"]), lora_bias=get(c["lora_bias"]),
            ),
            scale=c["scale"], weight=c["weight"], sign=c["sign"],
        )
        for c in entry["contributions"]
    ]
    return TensorOp(name=entry["name"], kind=entry["kind"], layer_path=entry["layer_path"],
                    layout=entry["layout"], contributions=contributions,
                    replacement=get(entry["replacement"]), source=entry["source"])


class Prewrite:
    """A weight-writing process: started (:func:`spawn`) before the export module is built, so
    its imports overlap the parent's, and given its work by :meth:`submit` once the module says
    which tensors the graph will hold."""

    def __init__(self, staging: Staging, process: subprocess.Popen[bytes], errors: Path) -> None:
        self.staging, self.process, self.errors = staging, process, errors
        self.failure: str | None = None  # why adopt() returned False, for tests and --json

    def submit(
        self,
        checkpoint: Checkpoint,
        plan: MergePlan | None,
        dtypes: Mapping[str, np.dtype],
        layers: Mapping[str, DenseLayer],
        quant: QuantOptions | None,
    ) -> bool:
        """Send the child its jobs for the checkpoint tensors in ``dtypes`` (name → export dtype:
        the export module's parameters). False (the child stopped) when they cannot be sent: a
        merge plan that does not serialize, or a child that has died."""
        jobs = plan_jobs(checkpoint, dtypes, layers, quant)
        ops = {j.name: plan.ops[j.name] for j in jobs
               if plan is not None and j.name in plan.ops}
        payload = self.staging.dir / "prewrite.json"
        try:
            arrays: dict[str, np.ndarray] = {}
            work = {
                "checkpoint": os.fspath(checkpoint.path),
                "data": os.fspath(self.staging.data_path),
                "quant": dataclasses.asdict(quant) if quant is not None else None,
                "jobs": [dataclasses.asdict(j) for j in jobs],
                "ops": {name: _op_to_json(op, name, arrays) for name, op in ops.items()},
            }
            write_safetensors(payload.with_suffix(".safetensors"), arrays)
            payload.write_text(json.dumps(work), encoding="utf-8")
            assert self.process.stdin is not None
            self.process.stdin.write(os.fsencode(payload) + b"\n")
            self.process.stdin.close()
            self.process.stdin = None  # sent: communicate() has nothing more to write
        except (TypeError, ValueError, OSError) as exc:
            self.failure = f"the writer could not be given its work ({exc})"
            self.abandon()
            return False
        return True

    def _index(self) -> list[Written] | None:
        out, _ = self.process.communicate()
        if self.process.returncode != 0:
            tail = self.errors.read_text(errors="replace").strip().splitlines()[-1:]
            self.failure = f"the writer exited {self.process.returncode}: {' '.join(tail)}"
            return None
        try:
            return [Written(e["name"], e["dtype"], tuple(e["shape"]), e["offset"], e["length"])
                    for e in json.loads(out)]
        except (ValueError, KeyError, TypeError) as exc:
            self.failure = f"the writer's index is unreadable ({exc})"
            return None

    def adopt(self, model: Any, progress: Callable[[int, int], None] | None = None) -> bool:
        """Wait for the child; make every initializer of the onnx_ir ``model`` it wrote an
        external tensor in the staging data file and append the others (over
        :data:`~loraformat.onnx_io.STAGED_INLINE_BYTES`). False — nothing changed, the data file
        removed — when the file does not fit the graph (:attr:`failure` says why)."""
        import onnx_ir as ir

        index = self._index()
        if index is None:
            self.abandon()
            return False
        graph = model.graph
        written = {w.name: w for w in index}
        for w in index:
            value = graph.initializers.get(w.name)
            tensor = value.const_value if value is not None else None
            if tensor is None or tensor.dtype.numpy() != _numpy_dtype(w.dtype) or tuple(
                int(d) for d in tensor.shape
            ) != w.shape:
                self.failure = f"the graph does not hold {w.name!r} as written"
                self.abandon()
                return False
        data = self.staging.data_path
        rest = [
            v for name, v in graph.initializers.items()
            if name not in written and v.const_value is not None
            and v.const_value.nbytes > STAGED_INLINE_BYTES
        ]
        total, done = len(index) + len(rest), 0

        def external(value: Any, offset: int, length: int) -> None:
            nonlocal done
            tensor = value.const_value
            value.const_value = ir.ExternalTensor(
                self.staging.data_name, offset, length, tensor.dtype, shape=tensor.shape,
                name=value.name, base_dir=self.staging.dir,
            )
            done += 1
            if progress is not None:
                progress(done, total)

        for w in index:
            external(graph.initializers[w.name], w.offset, w.length)
        with open(data, "ab") as handle:
            for value in rest:  # what the prediction missed, written here
                offset = handle.seek(0, os.SEEK_END)
                value.const_value.tofile(handle)
                handle.flush()
                external(value, offset, handle.tell() - offset)
        return True

    def abandon(self) -> None:
        """Stop the child (if running) and delete what it wrote."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        self.process.wait()
        with contextlib.suppress(OSError):
            self.staging.data_path.unlink()


def finish(
    writer: Prewrite | None, model: Any, external: bool,
    progress: Callable[[int, int], None] | None = None,
) -> bool:
    """Whether ``model``'s weights are in the staging data file now: ``writer``'s, adopted
    (:meth:`Prewrite.adopt`) where the export keeps its weights in an external data file;
    otherwise the writer, if any, is stopped and its file deleted."""
    if writer is None:
        return False
    if external and writer.adopt(model, progress):
        return True
    writer.abandon()
    return False


def parameter_dtypes(module: Any, checkpoint: Checkpoint) -> dict[str, np.dtype]:
    """Export dtype of each checkpoint tensor the torch export ``module`` has as a parameter:
    the initializers its graph will hold (what :meth:`Prewrite.submit` is given)."""
    from .stream import numpy_dtype

    return {name: numpy_dtype(param.dtype) for name, param in module.named_parameters()
            if name in checkpoint}


def spawn(staging: Staging) -> Prewrite | None:
    """Start the child; it imports what it needs and waits for :meth:`Prewrite.submit`. None
    when no interpreter can be started (an embedded Python): the export writes in-process."""
    root = str(Path(__file__).resolve().parents[2])  # where this loraformat is imported from
    # First on sys.path, before the working directory `-m`/`-c` would put there: another
    # `loraformat` folder in it must not stand in for this one.
    start = (f"import sys; sys.path.insert(0, {root!r}); "
             "from loraformat.export.prewrite import main; sys.exit(main([]))")
    # one core each: the parent traces on the other; BLAS threads would only contend
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    errors = staging.dir / "prewrite.log"
    try:
        with open(errors, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-c", start],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
            )
    except OSError:
        return None
    return Prewrite(staging, process, errors)


#: Below this many weight bytes the export writes its weights itself: the child's start-up (about
#: a second of imports on another core) would cost as much as it saves.
PREWRITE_MIN_BYTES = 256 * 1024**2


@contextlib.contextmanager
def staged_weights(
    out: Path, checkpoint: Checkpoint, use: bool | None = None
) -> Iterator[tuple[Staging, Prewrite | None]]:
    """The output's :class:`~loraformat.onnx_io.Staging` and, where it is used, the
    weight-writing child, started and waiting for :meth:`Prewrite.submit`: ``use`` True/False
    forces it on/off; ``None`` starts it when :func:`enabled` and the checkpoint holds
    :data:`PREWRITE_MIN_BYTES` or more. On leaving, a child still running is stopped and the
    staging directory removed (the output, if saved, is out of it by then)."""
    staging = Staging(out)
    writer = None
    try:
        size = sum(checkpoint.info(n).nbytes for n in checkpoint.names())
        if use or (use is None and enabled() and size >= PREWRITE_MIN_BYTES):
            writer = spawn(staging)
        yield staging, writer
    finally:
        if writer is not None and writer.process.poll() is None:
            writer.abandon()
        staging.remove()


def write(payload: Path) -> list[dict[str, Any]]:
    """The child's work: every job of ``payload`` into its data file, fsynced; the index."""
    import onnx_ir as ir

    release_freed_buffers()  # one tensor-sized buffer after another, as in-process
    work = json.loads(payload.read_text(encoding="utf-8"))
    with SafetensorsFile(payload.with_suffix(".safetensors")) as arrays:
        ops = {name: _op_from_json(e, arrays) for name, e in work["ops"].items()}
    plan = MergePlan(ops=ops, layer_count=len(ops)) if ops else None
    quant = QuantOptions(**work["quant"]) if work["quant"] is not None else None
    jobs = [Job(**j) for j in work["jobs"]]
    path, data = work["checkpoint"], work["data"]
    index = []
    with Checkpoint(path) as checkpoint, open(data, "wb") as handle:

        def written(name: str, dtype: str, shape: Sequence[int], offset: int) -> None:
            handle.flush()
            index.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset,
                          "length": handle.tell() - offset})

        for job in jobs:
            if job.kind == "float" and (plan is None or job.name not in plan.ops):
                # unmerged: copied through, never whole in memory (an 8B table is 1-2 GiB)
                offset = handle.tell()
                copy_tensor(checkpoint, job.name, _numpy_dtype(job.dtype), handle)
                written(job.name, job.dtype, checkpoint.info(job.name).shape, offset)
                continue
            for name, value in job_tensors(checkpoint, plan, job, quant):
                offset = handle.tell()
                ir.Tensor(value, name=name).tofile(handle)  # the bytes onnx_ir itself writes
                written(name, value.dtype.name, value.shape, offset)
        handle.flush()
        os.fsync(handle.fileno())
    return index


def main(argv: Sequence[str]) -> int:
    """The child: the path of its work on stdin (none: exit). Run by :func:`spawn` (or ``python
    -m loraformat.export.prewrite``)."""
    if argv:
        print("usage: python -m loraformat.export.prewrite < PAYLOAD-PATH", file=sys.stderr)
        return 2
    line = sys.stdin.buffer.readline().strip()
    if not line:  # the parent wrote its weights itself
        return 0
    index = write(Path(os.fsdecode(line)))
    sys.stdout.write(json.dumps(index))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
