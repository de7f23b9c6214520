"""A cache of traced export graphs: the second export of a base model does not trace it again.

Tracing is most of an export's time (``torch.onnx.export`` and onnxscript's optimizer, even on the
two layers :mod:`.repeat` traces), and it depends only on the module's structure, never on the
weights: every adapter merged into one base gives the same graph. So the traced, optimized graph
is kept, *without weights* (the checkpoint tensors become graph inputs in the cached file; a few
megabytes), under a key that covers everything the trace depends on:

* the export module: its architecture id, the config and options it was built from, every
  parameter's name, shape and dtype, every buffer's value (rotary tables), its example inputs,
  input and output names and dynamic axes, the opset;
* the code: a hash of loraformat's own source and of the plugin's package, and the versions of
  torch, onnxscript, onnx_ir and onnx.

Where: ``$LORAFORMAT_CACHE/graphs`` if that variable is set (``off``, ``0`` or empty: no cache),
else ``$XDG_CACHE_HOME/loraformat/graphs`` (``~/.cache/loraformat/graphs``). Entries are written
atomically; an unreadable entry is traced anew and replaced; a cache that cannot be written is
skipped. Delete the folder to clear it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from ..onnx_io import weights_as_inputs

#: Environment variable naming the cache folder (``off`` disables the cache).
CACHE_ENV = "LORAFORMAT_CACHE"
#: Bumped whenever what an entry holds changes meaning.
ENTRY_VERSION = 1
_WEIGHTS = "loraformat.cache.weights"


def cache_dir() -> Path | None:
    """Where graphs are cached, or ``None`` when caching is off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        if chosen.strip().lower() in ("", "0", "off", "no", "none", "false"):
            return None
        return Path(chosen).expanduser() / "graphs"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraformat" / "graphs"


def _files_digest(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@cache
def _package_digest(folder: str) -> str:
    return _files_digest(Path(folder).rglob("*.py"))


def code_digest(*objects: Any) -> str:
    """A hash of loraformat's source and of the packages (or modules) defining ``objects``."""
    import loraformat

    folders = {str(Path(loraformat.__file__).parent)}
    for obj in objects:
        module = sys.modules.get(type(obj).__module__)
        source = getattr(module, "__file__", None)
        if source:
            package = Path(source).parent
            folders.add(str(package if (package / "__init__.py").is_file() else source))
    h = hashlib.sha256()
    for folder in sorted(folders):
        digest = (_package_digest(folder) if Path(folder).is_dir()
                  else _files_digest([Path(folder)]))
        h.update(digest.encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "onnxscript", "onnx_ir", "onnx", "loraformat"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def graph_key(exported: Any, opset: int, identity: Mapping[str, Any]) -> str:
    """The cache key of tracing ``exported`` (an ExportModel) at ``opset``; ``identity`` holds
    what built the module (architecture id, config, options, code digest)."""
    import torch

    h = hashlib.sha256()

    def add(*items: Any) -> None:
        h.update(json.dumps(items, sort_keys=True, default=repr).encode())
        h.update(b"\0")

    add(ENTRY_VERSION, _versions(), opset, dict(identity))
    for name, p in exported.module.named_parameters():
        add("param", name, list(p.shape), str(p.dtype))
    for name, b in exported.module.named_buffers():
        add("buffer", name, list(b.shape), str(b.dtype))
        h.update(b.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    for name, value in exported.example_inputs.items():
        shape = list(getattr(value, "shape", []))
        add("input", name, shape, str(getattr(value, "dtype", type(value).__name__)))
    add(list(exported.input_names), list(exported.output_names),
        {k: {str(a): n for a, n in v.items()} for k, v in exported.dynamic_axes.items()})
    return h.hexdigest()


def _unread(value: Any) -> Any:
    """A stand-in weight for a graph loaded from the cache: the exporter gives every checkpoint
    tensor its real (lazy) value before anything reads it."""
    import onnx_ir as ir

    def fail() -> Any:
        raise RuntimeError(f"weight {value.name} of a cached graph was read before it was set")

    return ir.LazyTensor(fail, dtype=value.dtype, shape=value.shape, name=value.name)


def load(key: str) -> Any | None:
    """The cached graph of ``key`` with its weights as stand-ins, or ``None``."""
    import onnx_ir as ir

    folder = cache_dir()
    if folder is None or not (folder / f"{key}.onnx").is_file():
        return None
    try:
        model = ir.load(folder / f"{key}.onnx")
        names = json.loads(model.metadata_props.pop(_WEIGHTS))
        inputs = {v.name: v for v in model.graph.inputs}
        for name in names:
            value = inputs[name]
            model.graph.inputs.remove(value)
            value.const_value = _unread(value)
            model.graph.register_initializer(value)
    except Exception:  # an unreadable or foreign entry: trace again (and replace it)
        return None
    return model


def store(key: str, model: Any, weights: set[str]) -> None:
    """Keep ``model`` under ``key``, the initializers named in ``weights`` left out (as graph
    inputs). ``model`` is unchanged afterwards. A cache that cannot be written is skipped."""
    import onnx_ir as ir

    folder = cache_dir()
    if folder is None:
        return
    with weights_as_inputs(model, weights) as hidden:
        model.metadata_props[_WEIGHTS] = json.dumps([v.name for v in hidden])
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
            os.close(fd)
            try:
                ir.save(model, tmp)
                os.replace(tmp, folder / f"{key}.onnx")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError:
            pass  # read-only home, full disk: the export itself is unaffected
        finally:
            del model.metadata_props[_WEIGHTS]


def cached_trace(
    exported: Any,
    weights: set[str],
    opset: int,
    identity: Mapping[str, Any],
    trace: Callable[[], Any],
) -> tuple[Any, bool]:
    """``trace()``'s graph of ``exported``, from the cache when it holds it: (graph, from cache)."""
    if cache_dir() is None:
        return trace(), False
    key = graph_key(exported, opset, identity)
    model = load(key)
    if model is not None:
        return model, True
    model = trace()
    store(key, model, weights)
    return model, False


__all__ = [
    "CACHE_ENV",
    "cache_dir",
    "cached_trace",
    "code_digest",
    "graph_key",
    "load",
    "store",
]
