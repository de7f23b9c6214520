"""What every codec shares: the conversion context, lossy-change bookkeeping, name translation.

A codec never decides on its own to drop or distort something: it calls
:meth:`Context.lossy` with one sentence saying what cannot be carried, and
:meth:`Context.check_lossy` refuses the whole conversion (one line listing every such item) unless
the caller asked for ``lossy=True``. Changes of *representation* that keep the adapter's outputs
(folding a scale into B, padding zero rows) are recorded with :meth:`Context.note`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import LoraLayer, scale_of

if TYPE_CHECKING:
    from ..base import BaseModel

Progress = Callable[[int, int], None] | None


@dataclass
class Report:
    """What a conversion did. ``notes``: representation changes that keep the outputs;
    ``lossy``: what was dropped or changed because the target cannot carry it (only with
    ``lossy=True``)."""

    source_format: str = ""
    target_format: str = ""
    source: str = ""
    target: str = ""
    layers: int = 0
    notes: list[str] = field(default_factory=list)
    lossy: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.source_format,
            "to": self.target_format,
            "input": self.source,
            "output": self.target,
            "layers": self.layers,
            "notes": list(self.notes),
            "lossy": list(self.lossy),
        }


@dataclass
class Context:
    """Options of one conversion plus its report.

    ``base``: an opened base model (architecture, config, dense layers) or ``None``.
    ``options``: codec-specific options (``alpha``, ``rank``, ``enable_lora`` for loralib,
    ``architecture``, ``dtype``...). Unknown options are refused by :func:`convert`.
    """

    base: BaseModel | None = None
    allow_lossy: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    report: Report = field(default_factory=Report)
    progress: Progress = None
    _pending: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if message not in self.report.notes:
            self.report.notes.append(message)

    def lossy(self, message: str) -> None:
        """Record something the target cannot carry; refused later unless ``allow_lossy``."""
        if message not in self._pending:
            self._pending.append(message)

    def check_lossy(self, path: str | os.PathLike[str] | None, target: str) -> None:
        """Refuse if anything lossy was recorded and the caller did not allow it."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self.allow_lossy:
            raise LoraformatError(
                path,
                f"cannot be carried to {target} without loss: " + "; ".join(pending)
                + "; rerun with [[lossy]] to convert anyway",
            )
        for message in pending:
            if message not in self.report.lossy:
                self.report.lossy.append(message)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.base.config) if self.base is not None else {}

    @property
    def present(self) -> Container[str] | None:
        """The base checkpoint's tensor names (``None`` without a base), for :class:`Names`."""
        return self.base.checkpoint.shapes() if self.base is not None else None

    def tick(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


# -- names --------------------------------------------------------------------------------------


class Names:
    """Translate between loraformat layer paths and a foreign convention through the
    architecture's name table.

    ``identity_fallback``: when the table has no row, use the name unchanged (right for PEFT on
    architectures whose in-memory module names equal their checkpoint names, and for checkpoints
    no plugin recognises). ``present``: the base checkpoint's tensor names, so a layer path is
    returned as that checkpoint stores it (see :meth:`NameTable.layer_path`).
    """

    def __init__(
        self, architecture: str, config: Mapping[str, Any], convention: str,
        *, identity_fallback: bool, present: Container[str] | None = None,
    ) -> None:
        from ..architecture import registry

        self.architecture = architecture
        self.config = dict(config)
        self.convention = convention
        self.identity_fallback = identity_fallback
        self.present = present
        found = registry().architectures().get(architecture)
        #: ``None`` when no installed plugin provides the architecture (a generic checkpoint).
        self.table = found.names if found is not None else None

    def missing(self, what: str) -> str:
        """Why nothing could be named: the plugin has no such column, or there is no plugin."""
        if self.table is None:
            return (f"{what} needs an architecture plugin for {self.architecture!r}, and none is "
                    "installed")
        return f"the {self.architecture!r} plugin gives no {what}"

    def to_foreign(self, path: str) -> str | None:
        name = self.table.foreign(path, self.convention) if self.table is not None else None
        if name is None and self.identity_fallback:
            return path
        return name

    def to_path(self, foreign: str) -> str | None:
        path = None
        if self.table is not None:
            path = self.table.layer_path(foreign, self.convention, present=self.present)
        if path is None and self.identity_fallback:
            return foreign
        return path


def detect_architecture(
    config: Mapping[str, Any], tensor_names: list[str]
) -> str | None:
    """Which installed architecture a (possibly partial) config and tensor names are, by id."""
    from ..architecture import CheckpointInfo, detect

    found = detect(CheckpointInfo(config=config, shapes=dict.fromkeys(tensor_names, ())))
    return found.id if found is not None else None


def architectures_naming(layer_paths: list[str]) -> list[str]:
    """The installed architectures whose name table holds every one of ``layer_paths``."""
    from ..architecture import registry

    return sorted(
        arch_id for arch_id, arch in registry().architectures().items()
        if layer_paths and all(arch.names.foreign(p, "checkpoint") for p in layer_paths)
    )


def adapter_architecture(
    path: str | os.PathLike[str], ctx: Context, layer_paths: list[str], what: str,
    *, said: str | None = None, config: Mapping[str, Any] | None = None,
    given: str | None = None,
) -> str:
    """The architecture an adapter being read is for, decided the same way for every format.

    What the adapter itself says (``said``: an id it records; ``config``: a partial model config
    such as PEFT's ``auto_mapping``) must agree with the base (``ctx.base``) and the
    ``architecture`` option; a disagreement is refused naming both. Without a base or the option,
    the adapter's own word decides, else its layer names, but only when they are one installed
    architecture's: names many families share (``model.layers.N.self_attn.q_proj``) leave it
    unknown, and the reader is refused rather than guess. ``given`` overrides the option.
    """
    if said is None and config:
        said = detect_architecture(config, [])
    given = given or ctx.options.get("architecture")
    if ctx.base is not None:
        base_arch = ctx.base.architecture
        wanted = given or said
        if wanted and wanted != base_arch:
            # a file several plugins write alike (a GGUF model) is read as the one asked for
            view = ctx.base.read_as(wanted)
            if view is not None and not (given and said and given != said):
                ctx.base = view
                return wanted
        if given and given != base_arch:
            raise LoraformatError(
                path, f"architecture {given!r} given, but the base {ctx.base.path} is {base_arch!r}"
            )
        if said and said != base_arch:
            raise LoraformatError(
                path, f"adapter is for architecture {said!r}, but the base {ctx.base.path} is "
                f"{base_arch!r}",
            )
        return base_arch
    if given:
        if said and said != given:
            raise LoraformatError(
                path, f"adapter is for architecture {said!r}, but {given!r} was given"
            )
        return given
    if said:
        return said
    fitting = architectures_naming(layer_paths)
    found = detect_architecture({}, [p + ".weight" for p in layer_paths])
    if found is not None and fitting in ([], [found]):
        return found
    shared = f" (its layer names fit {', '.join(fitting)})" if len(fitting) > 1 else ""
    raise LoraformatError(
        path, f"architecture unknown: {what} does not say which model it is for{shared}; "
        "pass the base model (--base BASE)",
    )


# -- arrays -------------------------------------------------------------------------------------


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU torch tensor → numpy, bfloat16 through ``ml_dtypes`` (numpy has no bf16)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def numpy_to_torch(array: np.ndarray) -> Any:
    import ml_dtypes
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def refuse_escape(directory: Path, *members: Path) -> None:
    """An input directory's files must lie inside it: no symbolic link may lead out (as for
    loraformat adapters, spec/FORMAT.md §9), so a hostile download cannot make a reader open
    files elsewhere."""
    from ..format import adapter

    for member in members:
        if _hub_cache_blob(directory, member):
            continue
        adapter.refuse_escape(directory, member)


def _hub_cache_blob(directory: Path, member: Path) -> bool:
    """True for the one link layout the Hugging Face hub cache uses, which is not an escape:
    ``<repo>/snapshots/<revision>/<file>`` → ``<repo>/blobs/<hash>``, inside the same repo."""
    if not member.is_symlink():
        return False
    snapshot = directory.resolve()
    for parent in (snapshot, *snapshot.parents):
        if parent.parent.name == "snapshots":
            repo = parent.parent.parent
            break
    else:
        return False
    target = member.resolve()
    return target.parent == repo / "blobs" and target.is_file()


def torch_load_weights_only(path: Path) -> dict[str, np.ndarray]:
    """Read a pickled torch checkpoint with ``torch.load(weights_only=True)``, never unpickling.

    ``weights_only=True`` refuses any pickled object other than tensors and plain containers, so a
    malicious checkpoint cannot run code. Nested ``{"state_dict": {...}}`` /
    ``{"model_state_dict": {...}}`` wrappers are unwrapped.
    """
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: not for users
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraformatError(
            path, f"refused to unpickle: not loadable with torch.load(weights_only=True) ({first})"
        ) from None
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise LoraformatError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[str(key)] = torch_to_numpy(value)
    return out


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as in-memory arrays, plus its metadata."""
    from ..format.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as st:
        return {name: np.array(st.numpy(name)) for name in st}, dict(st.metadata)


def scaled(array: np.ndarray, factor: float) -> np.ndarray:
    """``array·factor`` in the array's dtype (computed in float32 or wider); unchanged if 1."""
    if factor == 1.0:
        return array
    wide = np.float64 if array.dtype == np.float64 else np.float32
    return (array.astype(wide) * wide(factor)).astype(array.dtype)


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """A temporary sibling path for writers that insist on opening the file themselves (gguf,
    onnxruntime); on success it is fsynced and renamed onto ``out`` in one step."""
    from ..atomic import TMP_MARKER, default_mode, make_parents, remove_made

    made = make_parents(out)
    fd, name = tempfile.mkstemp(prefix=TMP_MARKER, suffix="-" + out.name, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fchmod(handle.fileno(), default_mode(False))  # not mkstemp's 0600
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        remove_made(made)
        raise


def alpha_for_scale(scale: float, rank: int, rule: str) -> float:
    """An alpha whose ``scale_of(rule, alpha, rank)`` is exactly ``scale`` where one exists."""
    base = scale * rank if rule == "alpha/r" else scale * math.sqrt(rank)
    candidate = base
    for _ in range(4):  # a correctly rounded division is within an ulp or two
        if scale_of(rule, candidate, rank) == scale:
            return candidate
        candidate = math.nextafter(
            candidate, math.inf if scale_of(rule, candidate, rank) < scale else -math.inf
        )
    return base


def fit_rank(layer: LoraLayer, scaling: str, ctx: Context) -> LoraLayer:
    """``layer`` as the format can hold it when its rank exceeds its smaller dimension (the
    format's bound, spec/FORMAT.md §9): PEFT and mlx-lm allow any r, and ``all-linear`` at a
    common rank exceeds a narrow layer's size (Qwen3.5's ``in_proj_a``/``in_proj_b`` have one row
    per value head). B·A has rank at most that dimension, so it is stored exactly at it: B·A as
    A with B the identity (or the reverse), the scale unchanged — the same ΔW up to rounding in
    the adapter's dtype. Fused, expert and embedding layers are left to the format's checks."""
    rows = int(layer.B.shape[0])
    bound = min(layer.in_features, rows)
    if (layer.rank <= bound or layer.kind != "linear" or layer.out_rows is not None
            or layer.experts is not None):
        return layer
    product = layer.B.astype(np.float64) @ layer.A.astype(np.float64)
    a, b = (product, np.eye(rows)) if rows <= layer.in_features else (
        np.eye(layer.in_features), product)
    ctx.note("layers whose rank exceeds their smaller dimension are stored at that dimension "
             "(the same ΔW: B·A refactored exactly)")
    return dataclasses.replace(
        layer, A=a.astype(layer.A.dtype), B=b.astype(layer.B.dtype),
        alpha=alpha_for_scale(scale_of(scaling, layer.alpha, layer.rank), bound, scaling),
    )
