"""What runs an exported graph for ``--verify``: ONNX Runtime, or ONNX's reference evaluator
where ONNX Runtime has no kernels for the graph's dtype.

ONNX Runtime's CPU provider has no bfloat16 kernels (MatMul, Add, Mul, ReduceMax fail with
NOT_IMPLEMENTED in onnxruntime 1.31); its CUDA provider has them. A bfloat16 graph is therefore
run on CUDAExecutionProvider when this build and machine have it, and otherwise by
``onnx.reference.ReferenceEvaluator``: onnx's own numpy implementation of the operator specs,
independent of both torch and ONNX Runtime. It loads every weight (the graph's size in memory)
and computes in numpy (``ml_dtypes`` bf16); on the 0.49B model of ``tools/bench_export.py`` a
``--verify`` took 36.5 s at 2.65 GiB peak RSS, fp16's in ONNX Runtime CPU 37.4 s / 3.05 GiB
(``tools/bench_export_verify.py``).
The runner used is named in the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import LoraformatError

#: The "provider" name for onnx's reference evaluator, in provider lists and results.
REFERENCE_EVALUATOR = "onnx.reference.ReferenceEvaluator"
#: Export dtypes ONNX Runtime's CPU provider cannot run.
NO_CPU_KERNELS = frozenset({"bfloat16"})

_ELEMENT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(bfloat16)": np.dtype(ml_dtypes.bfloat16),
}


def as_numpy(value: Any) -> np.ndarray:
    """A CPU torch tensor (or array) as numpy; bfloat16 as float32, exactly (numpy has no
    bf16, and every bf16 value is a float32 value)."""
    if isinstance(value, np.ndarray):
        return value
    import torch

    if value.dtype == torch.bfloat16:
        value = value.to(torch.float32)
    return value.numpy()


def ort_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it and a CUDA device is present, then CPU."""
    import onnxruntime
    import torch

    available = onnxruntime.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


def providers_for(dtype: str) -> list[str]:
    """The runners ``--verify`` uses for an export in ``dtype``: ONNX Runtime's providers, or the
    reference evaluator where the dtype has no CPU kernels and no CUDA provider is here."""
    providers = ort_providers()
    if dtype in NO_CPU_KERNELS and "CUDAExecutionProvider" not in providers:
        return [REFERENCE_EVALUATOR]
    return providers


def runner_name(provider: str) -> str:
    """How a message names what ran the graph: an ONNX Runtime provider, or the evaluator."""
    return provider if provider == REFERENCE_EVALUATOR else f"ONNX Runtime ({provider})"


@dataclass
class GraphRunner:
    """One loaded graph: ``run(feed)`` returns its outputs, floating inputs cast to the dtype the
    graph takes (``inputs``: name → numpy dtype); ``provider`` names what runs it."""

    session: Any
    provider: str
    names: frozenset[str]  # every graph input
    inputs: dict[str, np.dtype]
    path: str = ""

    def run(self, feed: Mapping[str, Any]) -> list[np.ndarray]:
        """Run on ``feed`` (numpy arrays or CPU torch tensors, by graph input name; names the
        graph does not take are left out)."""
        feed = {k: as_numpy(v) for k, v in feed.items() if k in self.names}
        cast = {k: (v.astype(self.inputs[k]) if k in self.inputs else v) for k, v in feed.items()}
        if self.provider != REFERENCE_EVALUATOR:
            return list(self.session.run(None, cast))  # ONNX Runtime's errors: callers word them
        try:
            return list(self.session.run(None, cast))
        except Exception as exc:  # an op the evaluator cannot compute
            raise _cannot_evaluate(self.path, exc) from exc


def _cannot_evaluate(path: str, exc: Exception) -> LoraformatError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return LoraformatError(
        path, f"verify: {REFERENCE_EVALUATOR} cannot run the graph ({reason}); ONNX Runtime "
        "runs bfloat16 only on CUDAExecutionProvider",
    )


def open_runner(
    onnx_path: str | os.PathLike[str], providers: Sequence[str] | None = None
) -> GraphRunner:
    """The graph at ``onnx_path`` ready to run: by the reference evaluator when ``providers``
    names it first, else in an ONNX Runtime session with ``providers`` (default
    :func:`ort_providers`)."""
    providers = list(providers or ort_providers())
    if providers[0] == REFERENCE_EVALUATOR:
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(os.fspath(onnx_path))  # external data included
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
        inputs = {
            i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in proto.graph.input if i.type.tensor_type.elem_type in floats
        }
        names = frozenset(i.name for i in proto.graph.input)
        try:
            evaluator = ReferenceEvaluator(proto)
        except Exception as exc:  # an op it does not know (a com.microsoft fusion)
            raise _cannot_evaluate(os.fspath(onnx_path), exc) from exc
        return GraphRunner(evaluator, REFERENCE_EVALUATOR, names, inputs, os.fspath(onnx_path))
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # errors only: a slot graph's zero-rank defaults are initializers that are also graph inputs,
    # by design, and ONNX Runtime warns once for each
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(os.fspath(onnx_path), sess_options=options,
                                           providers=providers)
    inputs = {i.name: _ELEMENT_DTYPES[i.type] for i in session.get_inputs()
              if i.type in _ELEMENT_DTYPES}
    names = frozenset(i.name for i in session.get_inputs())
    return GraphRunner(session, session.get_providers()[0], names, inputs, os.fspath(onnx_path))


__all__ = [
    "NO_CPU_KERNELS",
    "REFERENCE_EVALUATOR",
    "GraphRunner",
    "as_numpy",
    "open_runner",
    "ort_providers",
    "providers_for",
    "runner_name",
]
