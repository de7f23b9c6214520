"""One ONNX Runtime session over a base graph with LoRA slots, many adapters chosen per call.

The graph comes from ``loraformat export BASE --lora-slots`` (:func:`loraformat.export.slots.
export_with_slots`): each targeted dense layer ``P`` has graph inputs ``P.lora_A`` [in, r] and
``P.lora_B`` [r, out] with same-named zero-rank default initializers, so with no adapter active the
graph computes the plain base. An adapter is an ``onnxruntime.LoraAdapter`` whose parameters carry
those names; ``RunOptions.add_active_adapter`` feeds them for one call. Adapters are therefore
loaded once and only *chosen* per request: switching costs no session rebuild and no weight copy
into the graph.

Threading: one ``InferenceSession`` is shared (its ``run`` is thread-safe), every call builds its
own ``RunOptions``, and a lock guards only the adapter table. A call keeps a reference to the
adapters it chose, so :meth:`Session.unload` during an in-flight call is safe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter
from ..onnx_io import SLOT_A, SLOT_B, ort_load_error

ONNX_ADAPTER_SUFFIX = ".onnx_adapter"

_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
}


@dataclass(frozen=True)
class Slot:
    """A layer's LoRA slot in the graph: A is [in_features, r], B is [r, out_features]."""

    path: str
    in_features: int
    out_features: int
    dtype: np.dtype

    @property
    def names(self) -> tuple[str, str]:
        return self.path + SLOT_A, self.path + SLOT_B


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter held by a :class:`Session`: the ORT object and the layers it fills."""

    name: str
    source: str
    ort_adapter: Any  # onnxruntime.LoraAdapter
    layers: dict[str, int]  # layer path → rank


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def default_providers() -> list[str]:
    """CPU unless the caller asks otherwise: a GPU provider is an explicit choice."""
    return ["CPUExecutionProvider"]


class Session:
    """An ONNX Runtime session over a LoRA-slot graph with named, switchable adapters.

    ``Session(model)`` opens the graph; ``load(name, path)`` adds an adapter (a ``.onnx_adapter``
    file, a loraformat adapter directory/``.safetensors`` file, or an :class:`Adapter`);
    ``run(inputs, adapter=...)`` runs with none, one, or several adapters active — several only if
    they fill different layers. Loaded adapters stay in memory until :meth:`unload`.

    Device memory: ORT's Python binding (1.31) has only ``LoraAdapter.Load(path)``, which
    memory-maps the file in host memory; the C API's ``CreateLoraAdapter(path, allocator)``,
    which copies the parameters to the device once, is not exposed to Python. With a GPU
    provider the active parameters are therefore fed like host inputs and copied per call
    (small: r·(in+out) values per layer). Not measured here (no GPU in this session).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        providers: Sequence[Any] | None = None,
        session_options: Any | None = None,
    ) -> None:
        ort = _ort()
        self.path = Path(model)
        if not self.path.is_file():
            raise LoraformatError(self.path, "ONNX model not found")
        options = session_options or ort.SessionOptions()
        if session_options is None:
            # Every slot input has a default initializer by design; ORT warns about each one.
            options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.path),
                sess_options=options,
                providers=list(providers or default_providers()),
            )
        except Exception as exc:  # ORT raises its own types for unreadable graphs
            raise LoraformatError(self.path, ort_load_error(self.path, exc, "open")) from None
        self.slots: dict[str, Slot] = _find_slots(self._session)
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._lock = threading.Lock()
        self._adapters: dict[str, LoadedAdapter] = {}
        self._tmp: Path | None = None  # converted adapters live here while loaded
        meta = self._session.get_modelmeta().custom_metadata_map or {}
        self.architecture: str | None = meta.get("loraformat.architecture")
        self.base_fingerprint: str | None = meta.get("loraformat.base_fingerprint")

    # -- the graph --------------------------------------------------------------------------
    @property
    def inner(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession``."""
        return self._session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    # -- the adapter table ------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def adapter(self, name: str) -> LoadedAdapter:
        with self._lock:
            try:
                return self._adapters[name]
            except KeyError:
                raise LoraformatError(self.path, self._unknown(name)) from None

    def load(
        self,
        name: str,
        adapter: str | os.PathLike[str] | Adapter,
        *,
        format: str | None = None,
        base: Any = None,
        lossy: bool = False,
    ) -> LoadedAdapter:
        """Load an adapter once under ``name``; refuse a name in use or a mismatch with the graph.

        ``adapter`` is an :class:`Adapter`, or a path in any format :mod:`loraformat.interchange`
        reads (detected unless ``format``; ``base``, a checkpoint path or open base model, helps
        where a format needs it, e.g. PEFT names). A ``.onnx_adapter`` is checked against the
        slots (names, shapes, dtype — ORT casts nothing) and memory-mapped as is. Anything else is
        converted in memory by the interchange's ONNX Runtime adapter codec: A → Aᵀ [in, r],
        B → (scale·B)ᵀ [r, out], unadapted rows of a fused layer zero, in the graph's dtype. DoRA,
        LoRA biases, replaced tensors and embedding layers cannot be carried by a slot: refused,
        or dropped with ``lossy``.
        """
        if not isinstance(name, str) or not name:
            raise LoraformatError(
                self.path, f"adapter name must be a non-empty string, got {name!r}"
            )
        with self._lock:
            if name in self._adapters:
                raise LoraformatError(self.path, f"an adapter named {name!r} is already loaded")
        if isinstance(adapter, Adapter):
            source = str(adapter.path) if adapter.path else f"<adapter {name}>"
            loaded = self._load_converted(name, source, adapter, lossy)
        else:
            from ..interchange.front_door import identify_adapter, open_adapter

            path = Path(adapter)
            source = str(path)
            if not path.exists():
                raise LoraformatError(path, "adapter not found")
            if identify_adapter(path, format)[0] == "onnx_adapter":
                layers = self._check_onnx_adapter(path)
                ort_adapter = _ort().LoraAdapter()
                ort_adapter.Load(str(path))
                loaded = LoadedAdapter(name, source, ort_adapter, layers)
            else:
                options = {"architecture": self.architecture} if base is None else {}
                read = open_adapter(path, from_=format, base=base, **options)
                try:
                    loaded = self._load_converted(name, source, read, lossy)
                finally:
                    read.close()
        with self._lock:
            if name in self._adapters:  # another thread won the race for this name
                raise LoraformatError(self.path, f"an adapter named {name!r} is already loaded")
            self._adapters[name] = loaded
        return loaded

    def unload(self, name: str) -> None:
        """Forget an adapter. Calls already running with it finish with it."""
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise LoraformatError(self.path, self._unknown(name))

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        inputs: Mapping[str, Any],
        adapter: str | Iterable[str] | None = None,
        output_names: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Run the graph with the named adapter(s) active (``None``: the plain base).

        Several adapters may be active together if no two fill the same layer (ORT would
        silently let one override the other). A decoder's ``attention_mask`` left out is all
        ones (a batch without padding). Returns the outputs in ``output_names`` order
        (default: every graph output).
        """
        ort = _ort()
        chosen = self._choose(adapter)
        options = ort.RunOptions()
        for loaded in chosen:
            options.add_active_adapter(loaded.ort_adapter)
        feed = dict(inputs)
        if "attention_mask" in self._input_names and "attention_mask" not in feed and (
            "input_ids" in feed
        ):  # an unpadded batch: every token counts
            feed["attention_mask"] = np.ones(np.shape(feed["input_ids"]), dtype=np.int64)
        try:
            return self._session.run(
                list(output_names) if output_names else None, feed, options
            )
        except Exception as exc:
            names = ", ".join(a.name for a in chosen) or "none"
            raise LoraformatError(self.path, f"run failed (adapters: {names}): {exc}") from None

    def _choose(self, adapter: str | Iterable[str] | None) -> list[LoadedAdapter]:
        if adapter is None:
            return []
        names = [adapter] if isinstance(adapter, str) else list(adapter)
        with self._lock:
            missing = [n for n in names if n not in self._adapters]
            if missing:
                raise LoraformatError(self.path, self._unknown(missing[0]))
            chosen = [self._adapters[n] for n in dict.fromkeys(names)]
        owner: dict[str, str] = {}
        for loaded in chosen:
            for layer in loaded.layers:
                if layer in owner:
                    raise LoraformatError(
                        self.path,
                        f"adapters {owner[layer]!r} and {loaded.name!r} both adapt {layer}; "
                        "adapters active together must fill different layers",
                    )
                owner[layer] = loaded.name
        return chosen

    def _unknown(self, name: str) -> str:
        loaded = ", ".join(sorted(self._adapters)) or "none"
        return f"no adapter named {name!r} is loaded (loaded: {loaded})"

    # -- loading helpers --------------------------------------------------------------------
    def _slot(self, where: str | os.PathLike[str], layer: str) -> Slot:
        slot = self.slots.get(layer)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            raise LoraformatError(
                where, f"layer {layer} has no LoRA slot in {self.path.name} (slots: {known})"
            )
        return slot

    def _check_onnx_adapter(self, path: Path) -> dict[str, int]:
        ort = _ort()
        try:
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as exc:
            raise LoraformatError(path, f"not a readable ONNX Runtime adapter ({exc})") from None
        shapes: dict[str, tuple[tuple[int, ...], str]] = {
            key: (tuple(value.shape()), value.data_type()) for key, value in params.items()
        }
        del params
        layers: dict[str, int] = {}
        for key, (shape, dtype) in sorted(shapes.items()):
            if key.endswith(SLOT_A):
                layer, role = key[: -len(SLOT_A)], SLOT_A
            elif key.endswith(SLOT_B):
                layer, role = key[: -len(SLOT_B)], SLOT_B
            else:
                raise LoraformatError(
                    path, f"parameter {key!r} is not a LoRA slot input (<layer>.lora_A/.lora_B)"
                )
            slot = self._slot(path, layer)
            other = layer + (SLOT_B if role == SLOT_A else SLOT_A)
            if other not in shapes:
                raise LoraformatError(path, f"parameter {key} has no matching {other}")
            expected_dtype = _type_string(slot.dtype)
            if dtype != expected_dtype:
                raise LoraformatError(
                    path,
                    f"parameter {key} is {dtype}, the graph's slot is {expected_dtype} "
                    "(ONNX Runtime does not cast adapter parameters)",
                )
            if len(shape) != 2:
                raise LoraformatError(
                    path, f"parameter {key} has shape {list(shape)}, expected 2-D"
                )
            rank = shape[1] if role == SLOT_A else shape[0]
            fixed, want = (
                (shape[0], slot.in_features) if role == SLOT_A else (shape[1], slot.out_features)
            )
            if fixed != want:
                expect = [want, "r"] if role == SLOT_A else ["r", want]
                raise LoraformatError(
                    path, f"parameter {key} has shape {list(shape)}, the slot takes {expect}"
                )
            if layers.setdefault(layer, rank) != rank:
                raise LoraformatError(
                    path,
                    f"{layer}.lora_A and .lora_B disagree on the rank ({layers[layer]} vs {rank})",
                )
        return layers

    def _load_converted(
        self, name: str, source: str, adapter: Adapter, lossy: bool = False
    ) -> LoadedAdapter:
        ort = _ort()
        if self.architecture and adapter.architecture != self.architecture:
            raise LoraformatError(
                source,
                f"adapter is for {adapter.architecture!r}, {self.path.name} is a "
                f"{self.architecture!r} model",
            )
        if (
            self.base_fingerprint
            and adapter.fingerprint
            and adapter.fingerprint != self.base_fingerprint
        ):
            raise LoraformatError(
                source,
                f"adapter was made for another base (fingerprint differs from {self.path.name}'s)",
            )
        arrays = slot_parameters(
            adapter, self.slots, where=source, model_name=self.path.name, lossy=lossy
        )
        values = {key: ort.OrtValue.ortvalue_from_numpy(array) for key, array in arrays.items()}
        writer = ort.AdapterFormat()
        writer.set_adapter_version(1)
        writer.set_model_version(1)
        writer.set_parameters(values)
        # The Python binding loads adapters only from a file (memory-mapped), so the converted
        # adapter is written to this session's private temp folder and removed on close().
        with self._lock:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="loraformat-session-"))
            tmp = self._tmp
        file = Path(tempfile.mkstemp(prefix="adapter-", suffix=ONNX_ADAPTER_SUFFIX, dir=tmp)[1])
        writer.export_adapter(str(file))
        ort_adapter = ort.LoraAdapter()
        ort_adapter.Load(str(file))
        layers = {path: int(arrays[path + SLOT_A].shape[1]) for path in adapter.layer_paths}
        return LoadedAdapter(name, source, ort_adapter, layers)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._adapters.clear()
            tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _type_string(dtype: np.dtype) -> str:
    for key, value in _ORT_DTYPES.items():
        if value == dtype:
            return key
    return str(dtype)


def _find_slots(session: Any) -> dict[str, Slot]:
    """Slots are overridable initializers named ``<layer>.lora_A`` / ``<layer>.lora_B`` in pairs."""
    args = {arg.name: arg for arg in session.get_overridable_initializers()}
    slots: dict[str, Slot] = {}
    for name, arg_a in args.items():
        if not name.endswith(SLOT_A):
            continue
        layer = name[: -len(SLOT_A)]
        arg_b = args.get(layer + SLOT_B)
        if arg_b is None or arg_a.type != arg_b.type or arg_a.type not in _ORT_DTYPES:
            continue
        in_features, out_features = arg_a.shape[0], arg_b.shape[-1]
        if not (isinstance(in_features, int) and isinstance(out_features, int)):
            continue
        slots[layer] = Slot(layer, in_features, out_features, _ORT_DTYPES[arg_a.type])
    return slots


def slot_parameters(
    adapter: Adapter,
    slots: Mapping[str, Slot],
    *,
    where: str | os.PathLike[str] | None = None,
    model_name: str = "the model",
    lossy: bool = False,
) -> dict[str, np.ndarray]:
    """An adapter's tensors in the slot convention, keyed by graph input name, in the slots' dtype.

    Checks every layer against the graph's slots (present, same features), then converts with
    :func:`loraformat.interchange.onnx_adapter.adapter_arrays` — the same arrays an
    ``.onnx_adapter`` written by ``loraformat convert`` holds.
    """
    from ..interchange import Context
    from ..interchange.onnx_adapter import adapter_arrays

    where = where if where is not None else (adapter.path or "adapter")
    dtypes = set()
    for path, spec in adapter.specs.items():
        if spec.kind != "linear" and lossy:
            continue  # dropped by the conversion below
        slot = slots.get(path)
        if slot is None:
            known = ", ".join(sorted(slots)) or "none"
            raise LoraformatError(
                where, f"layer {path} has no LoRA slot in {model_name} (slots: {known})"
            )
        if (spec.in_features, spec.out_features) != (slot.in_features, slot.out_features):
            raise LoraformatError(
                where,
                f"layer {path} is {spec.in_features}→{spec.out_features}, the slot in {model_name} "
                f"is {slot.in_features}→{slot.out_features}",
            )
        dtypes.add(slot.dtype)
    if len(dtypes) > 1:
        raise LoraformatError(where, f"the slots this adapter fills in {model_name} mix dtypes")
    dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
    ctx = Context(allow_lossy=lossy, options={"dtype": dtype.name})
    return adapter_arrays(adapter, ctx, Path(where))
