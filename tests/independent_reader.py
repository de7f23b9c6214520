"""An independent reader and validator of loraformat adapters, written from spec/FORMAT.md (1.2)
and schemas/adapter.v1.schema.json alone: it imports nothing from loraformat, and not the
safetensors package either (§1.1 is restated completely, and the package is more lenient than
the spec). Section numbers below are the spec's.

    manifest, tensors = read(path)        # raises Invalid when a MUST rule is broken
    read(path, content=False)             # only what a reader checks on opening (§9)
    delta(manifest, tensors, layer)       # ΔW, float64, out × in (E × out × in with experts)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np

MAX_HEADER = 104_857_600  # §1.1 item 1, §9
MAX_MANIFEST = 104_857_600  # §9
MAX_TENSORS = 1_000_000  # §1.1 item 5
SIZES = {  # §1.1 table
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
ADAPTER_DTYPES = ("F16", "BF16", "F32", "F64")
ROLES = ("lora_A", "lora_B", "magnitude", "lora_bias", "replacement")  # §3
KNOWN_MINOR = 2  # this reader implements 1.2 (tests set 1 or 0 to act as an older reader)
MAX_DEPTH = 64  # §2, §9
MAX_NUMBER = 4096  # §2, §9: characters of one number token
MAX_EXPERTS = 65_536  # §2

# §2 tables (1.1)
TOP = {"format", "format_version", "base_model", "scaling", "rank", "alpha", "layers",
       "replacements", "tensors_sha256", "provenance"}
TOP_REQUIRED = ("format", "format_version", "base_model", "scaling", "alpha", "layers",
                "tensors_sha256")
BASE = {"architecture", "name", "fingerprint"}
LAYER = {"in_features", "out_features", "rank", "alpha", "kind", "out_rows", "dora", "lora_bias",
         "experts"}
SINCE = {"experts": 2}  # §2, §8 step 3: layer members newer than 1.0, with their minor version
PATH = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")  # §3 grammar, whole string
SEGMENT = re.compile(r"[A-Za-z0-9_\-]+")
VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")  # §8


class Invalid(Exception):
    """A MUST rule of the spec is broken."""


# -- JSON (§1.1 item 2, §2) ---------------------------------------------------------------------


def _no_constant(name: str):
    raise Invalid(f"{name} is not JSON")


def _object(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise Invalid(f"repeated member {key!r}")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_object)


def check_json_text(text: str) -> None:
    """§2's limits, the same for every parser: nesting ≤ 64, number tokens ≤ 4096 characters.
    One pass over the text, outside strings."""
    depth = run = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char in "-+.0123456789eE":
            run += 1
            if run > MAX_NUMBER:
                raise Invalid("number token too long")
            continue
        run = 0
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise Invalid("nested too deeply")
        elif char in "]}":
            depth -= 1


def check_strings(value) -> None:
    """§2: every string (names and values) is Unicode scalar values — no lone surrogate."""
    if isinstance(value, str):
        if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise Invalid("lone surrogate in a string")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key)
            check_strings(item)
    elif isinstance(value, list):
        for item in value:
            check_strings(item)


def parse_json(text: str):
    """One JSON value, strictly: the whole text (JSON whitespace around it allowed)."""
    if text.startswith("\ufeff"):
        raise Invalid("byte order mark")
    check_json_text(text)
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_object)
    except RecursionError:
        raise Invalid("nested too deeply") from None
    except ValueError as exc:
        raise Invalid(f"not JSON: {exc}") from None
    check_strings(value)
    return value


# -- the container (§1.1) -----------------------------------------------------------------------


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_container(data: bytes) -> tuple[dict[str, str], dict[str, tuple[str, list[int], bytes]]]:
    """(__metadata__, name → (dtype, shape, bytes))."""
    if len(data) < 8:
        raise Invalid("no header size")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER:
        raise Invalid("header size over the limit")
    if 8 + n > len(data):
        raise Invalid("header beyond the end of the file")
    raw = data[8 : 8 + n]
    if raw[:1] != b"{":
        raise Invalid("header does not start with '{'")
    try:
        text = raw.decode("utf-8")
        check_json_text(text)
        header, end = _DECODER.raw_decode(text)
    except RecursionError:
        raise Invalid("nested too deeply") from None
    except ValueError as exc:
        raise Invalid(f"header not JSON: {exc}") from None
    if text[end:].strip(" "):
        raise Invalid("header padding is not spaces only")
    if not isinstance(header, dict):
        raise Invalid("header is not an object")
    check_strings(header)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise Invalid("__metadata__ does not map strings to strings")
    if len(header) > MAX_TENSORS:
        raise Invalid("too many tensors")
    buffer = data[8 + n :]
    spans = []
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise Invalid(f"{name}: not a tensor entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SIZES:
            raise Invalid(f"{name}: dtype {dtype!r} not in the table")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
            _int(d) and 0 <= d < 2**64 for d in shape
        ):
            raise Invalid(f"{name}: bad shape")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_int(o) and 0 <= o < 2**64 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise Invalid(f"{name}: bad data_offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * SIZES[dtype]:
            raise Invalid(f"{name}: byte size disagrees with shape and dtype")
        spans.append((offsets[0], offsets[1]))
        tensors[name] = (dtype, shape, bytes(buffer[offsets[0] : offsets[1]]))
    position = 0
    for begin, end in sorted(spans):  # by (begin, end): a zero-size tensor first (§1.1 item 3)
        if begin != position:
            raise Invalid("tensors do not tile the buffer (hole or overlap)")
        position = end
    if position != len(buffer):
        raise Invalid("tensors do not tile the buffer (end)")
    return metadata, tensors


# -- the manifest (§2, §8) ----------------------------------------------------------------------


def layer_members(minor: int) -> set[str]:
    """The layer-entry members of version 1.minor (§2)."""
    return {k for k in LAYER if SINCE.get(k, 0) <= minor}


def _drop_unknown(manifest: dict) -> dict:
    """§8 step 4: a newer minor version's unknown members are dropped at every level."""
    known_layer = layer_members(KNOWN_MINOR)
    out = {k: v for k, v in manifest.items() if k in TOP or k.startswith("x-")}
    if isinstance(out.get("base_model"), dict):
        out["base_model"] = {k: v for k, v in out["base_model"].items()
                             if k in BASE or k.startswith("x-")}
    if isinstance(out.get("layers"), dict):
        out["layers"] = {
            p: ({k: v for k, v in e.items() if k in known_layer or k.startswith("x-")}
                if isinstance(e, dict) else e)
            for p, e in out["layers"].items()
        }
    return out


def _members(obj: dict, known: set[str], where: str) -> None:
    for key in obj:
        if key not in known and not key.startswith("x-"):
            raise Invalid(f"{where}: unknown member {key!r}")


def _ranged(value, lo: int, hi: int | None, what: str) -> None:
    if not _int(value) or value < lo or (hi is not None and value > hi):
        raise Invalid(f"{what}: not an integer token in [{lo}, {hi}]")


def _finite(alpha) -> None:
    """§2: the value rounded to binary64 must be finite (an integer token too)."""
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise Invalid("alpha is not a number")
    try:
        value = float(alpha)
    except OverflowError:
        raise Invalid("alpha is not finite in binary64") from None
    if not math.isfinite(value):
        raise Invalid("alpha is not a finite number")


def _path(value, what: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= 512 or not PATH.fullmatch(value):
        raise Invalid(f"{what}: not a path (§3)")


def check_manifest(manifest) -> tuple[dict, int]:
    """The manifest as this reader uses it (unknown newer-minor members dropped), and its minor."""
    if not isinstance(manifest, dict):
        raise Invalid("manifest is not an object")
    if manifest.get("format") != "loraformat":
        raise Invalid("format is not 'loraformat'")
    version = manifest.get("format_version")
    match = VERSION.fullmatch(version) if isinstance(version, str) else None
    if not match:
        raise Invalid("format_version is not MAJOR.MINOR")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != 1:
        raise Invalid(f"major version {major}")
    if minor > KNOWN_MINOR:
        manifest = _drop_unknown(manifest)
    for key in TOP_REQUIRED:
        if key not in manifest:
            raise Invalid(f"missing {key}")
    _members(manifest, TOP, "manifest")
    base = manifest["base_model"]
    if not isinstance(base, dict):
        raise Invalid("base_model is not an object")
    _members(base, BASE, "base_model")
    arch = base.get("architecture")
    if not isinstance(arch, str) or not 1 <= len(arch) <= 128:
        raise Invalid("base_model.architecture")
    if "name" in base and not (isinstance(base["name"], str) and len(base["name"]) <= 1024):
        raise Invalid("base_model.name")
    if "fingerprint" in base and not (
        isinstance(base["fingerprint"], str)
        and re.fullmatch(r"lfp1:[0-9a-f]{64}", base["fingerprint"])
    ):
        raise Invalid("base_model.fingerprint")
    if manifest["scaling"] not in ("alpha/r", "alpha/sqrt(r)"):
        raise Invalid("scaling")
    if "rank" in manifest:
        _ranged(manifest["rank"], 1, 65536, "rank")
    if not isinstance(manifest["layers"], dict):
        raise Invalid("layers is not an object")
    _finite(manifest["alpha"])
    for path, entry in manifest["layers"].items():
        _path(path, "layer path")
        if not isinstance(entry, dict):
            raise Invalid(f"{path}: entry is not an object")
        # step 3: a member newer than the declared version is unknown to that version
        _members(entry, layer_members(min(minor, KNOWN_MINOR)), path)
        if "experts" in entry:
            _ranged(entry["experts"], 1, MAX_EXPERTS, f"{path}.experts")
        for key in ("in_features", "out_features"):
            if key not in entry:
                raise Invalid(f"{path}: missing {key}")
            _ranged(entry[key], 1, 16_777_216, f"{path}.{key}")
        if "rank" in entry:
            _ranged(entry["rank"], 1, 65536, f"{path}.rank")
        if "alpha" in entry:
            _finite(entry["alpha"])
        if entry.get("kind", "linear") not in ("linear", "embedding"):
            raise Invalid(f"{path}: kind")
        for flag in ("dora", "lora_bias"):
            if not isinstance(entry.get(flag, False), bool):
                raise Invalid(f"{path}: {flag} is not a boolean")
        if "out_rows" in entry:
            rows = entry["out_rows"]
            if not isinstance(rows, list) or not rows:
                raise Invalid(f"{path}: out_rows")
            for pair in rows:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise Invalid(f"{path}: out_rows item")
                _ranged(pair[0], 0, None, f"{path}.out_rows")
                _ranged(pair[1], 1, None, f"{path}.out_rows")
    if "replacements" in manifest:
        names = manifest["replacements"]
        if not isinstance(names, list) or len(set(map(str, names))) != len(names):
            raise Invalid("replacements: not a list of unique names")
        for name in names:
            _path(name, "replacement name")
    sha = manifest["tensors_sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise Invalid("tensors_sha256")
    if "provenance" in manifest and not isinstance(manifest["provenance"], dict):
        raise Invalid("provenance is not an object")
    return manifest, minor


def resolved(manifest: dict, path: str) -> tuple[int, float, dict]:
    entry = manifest["layers"][path]
    rank = entry.get("rank", manifest.get("rank"))
    alpha = entry.get("alpha", manifest["alpha"])
    return rank, alpha, entry


def row_list(entry: dict) -> list[int]:
    ranges = entry.get("out_rows", [[0, entry["out_features"]]])
    return [i for lo, hi in ranges for i in range(lo, hi)]


def check_layers(manifest: dict, minor: int) -> None:
    """§3, §4, §5, §9: the layer rules."""
    for path in manifest["layers"]:
        rank, _, entry = resolved(manifest, path)
        if rank is None:
            raise Invalid(f"{path}: no rank")
        if "out_rows" in entry:
            last = 0
            for lo, hi in entry["out_rows"]:
                if not (last <= lo < hi <= entry["out_features"]):
                    raise Invalid(f"{path}: out_rows ranges")
                last = hi
        if entry.get("dora") and "out_rows" in entry:
            raise Invalid(f"{path}: dora with out_rows")
        if entry.get("kind") == "embedding" and (
            entry.get("dora") or entry.get("lora_bias") or "out_rows" in entry
        ):
            raise Invalid(f"{path}: embedding with dora/lora_bias/out_rows")
        if "experts" in entry and (entry.get("dora") or entry.get("lora_bias")
                                   or entry.get("kind", "linear") != "linear"):
            raise Invalid(f"{path}: experts with dora/lora_bias/embedding")
        b_rows = len(row_list(entry))
        parts = len(entry.get("out_rows", [None]))
        # the file's rules, or this reader's if it is older (§8)
        rule = min(minor, KNOWN_MINOR)
        bound = min(entry["in_features"], b_rows) if rule == 0 else min(
            parts * entry["in_features"], b_rows)
        if rank > bound:
            raise Invalid(f"{path}: rank {rank} over the rank rule ({bound})")
    for name in manifest.get("replacements", []):
        layer, _, last = name.rpartition(".")
        # §3: an expert layer adapts <path> itself, any other layer <path>.weight
        if "experts" in manifest["layers"].get(name, {}):
            raise Invalid(f"{name}: replaces an expert layer's stacked weight")
        if (last == "weight" and layer in manifest["layers"]
                and "experts" not in manifest["layers"][layer]):
            raise Invalid(f"{name}: replaces an adapted weight")
        if last == "bias" and manifest["layers"].get(layer, {}).get("lora_bias"):
            raise Invalid(f"{name}: replaces the bias of a layer with lora_bias")


def implied_keys(manifest: dict) -> dict[str, list[int] | None]:
    """§3: key → shape (None: any shape)."""
    keys: dict[str, list[int] | None] = {}
    for path in manifest["layers"]:
        rank, _, entry = resolved(manifest, path)
        stack = [entry["experts"]] if "experts" in entry else []  # §4.7
        keys[f"{path}.lora_A"] = [*stack, rank, entry["in_features"]]
        keys[f"{path}.lora_B"] = [*stack, len(row_list(entry)), rank]
        if entry.get("dora"):
            keys[f"{path}.magnitude"] = [entry["out_features"]]
        if entry.get("lora_bias"):
            keys[f"{path}.lora_bias"] = [entry["out_features"]]
    for name in manifest.get("replacements", []):
        keys[f"{name}.replacement"] = None
    return keys


# -- values (§7, §9) ----------------------------------------------------------------------------


def array(dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    """float64 values of an adapter tensor (BF16: the high half of a binary32)."""
    if dtype == "BF16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(shape)
    return np.frombuffer(data, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]).astype(
        np.float64).reshape(shape)


def checksum(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        dtype, shape, data = tensors[name]
        digest.update(name.encode("utf-8") + b"\0" + dtype.encode("ascii") + b"\0")
        digest.update(",".join(map(str, shape)).encode("ascii") + b"\0")
        digest.update(struct.pack("<Q", len(data)) + data)
    return digest.hexdigest()


# -- reading an adapter (§1) --------------------------------------------------------------------


def _inside(folder: Path, member: Path) -> None:
    """§9: a member's fully resolved path lies under the directory's, by whole components; §1:
    it is a regular file."""
    if member.is_symlink():
        target = Path(os.path.realpath(member)).parts
        home = Path(os.path.realpath(folder)).parts
        if len(target) <= len(home) or target[: len(home)] != home:
            raise Invalid(f"{member.name}: link out of the adapter directory")
    if not stat.S_ISREG(os.stat(member).st_mode):
        raise Invalid(f"{member.name}: not a regular file")


def read(path: str | os.PathLike, content: bool = True
         ) -> tuple[dict, dict[str, tuple[str, list[int], bytes]]]:
    """(manifest as this reader uses it, name → (dtype, shape, bytes)) of a valid adapter.
    ``content``: also the checksum and values (a validator's duty; a reader's on opening is the
    rest, §9)."""
    path = Path(path)
    mode = os.stat(path).st_mode  # §1: the path is followed
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise Invalid("neither a directory nor a regular file")
    if path.is_dir():
        manifest_file, tensor_file = path / "adapter.json", path / "adapter.safetensors"
        for member in (manifest_file, tensor_file):
            _inside(path, member)
        if manifest_file.stat().st_size > MAX_MANIFEST:
            raise Invalid("adapter.json over the size limit")
        raw = manifest_file.read_bytes()
        if raw.startswith(b"\xef\xbb\xbf"):
            raise Invalid("byte order mark")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("adapter.json is not UTF-8") from None
        manifest = parse_json(text)
        _, tensors = read_container(tensor_file.read_bytes())  # its metadata is ignored (§1)
    else:
        metadata, tensors = read_container(path.read_bytes())
        if "loraformat" not in metadata:
            raise Invalid("no 'loraformat' metadata")
        manifest = parse_json(metadata["loraformat"])
    manifest, minor = check_manifest(manifest)
    check_layers(manifest, minor)
    implied = implied_keys(manifest)
    for key, shape in implied.items():
        if key not in tensors:
            raise Invalid(f"{key}: missing")
        dtype, actual, _ = tensors[key]
        if dtype not in ADAPTER_DTYPES:
            raise Invalid(f"{key}: dtype {dtype}")
        if shape is not None and actual != shape:
            raise Invalid(f"{key}: shape {actual}, expected {shape}")
    for key in tensors:
        if key not in implied:
            layer, _, role = key.rpartition(".")
            newer = (minor > KNOWN_MINOR and layer in manifest["layers"]
                     and SEGMENT.fullmatch(role) is not None and role not in ROLES)
            if not newer:  # §8 step 4: a newer minor's optional role of a declared layer
                raise Invalid(f"{key}: not implied by the manifest")
    if not content:
        return manifest, tensors
    if checksum(tensors) != manifest["tensors_sha256"]:
        raise Invalid("checksum mismatch")
    for key in implied:
        if not np.all(np.isfinite(array(*tensors[key]))):
            raise Invalid(f"{key}: non-finite values")
    return manifest, tensors


def scale(manifest: dict, layer: str) -> float:
    rank, alpha, _ = resolved(manifest, layer)
    return alpha / rank if manifest["scaling"] == "alpha/r" else alpha / math.sqrt(rank)


def delta(manifest: dict, tensors: dict, layer: str) -> np.ndarray:
    """§4.2: ΔW (out × in), out_rows placing B·A's rows; §4.7: E × out × in, one per expert."""
    _, _, entry = resolved(manifest, layer)
    a = array(*tensors[f"{layer}.lora_A"])
    b = array(*tensors[f"{layer}.lora_B"])
    rows = row_list(entry)
    if "experts" not in entry:
        full = np.zeros((entry["out_features"], entry["in_features"]))
        full[rows] = scale(manifest, layer) * (b @ a)
        return full
    full = np.zeros((entry["experts"], entry["out_features"], entry["in_features"]))
    for e in range(entry["experts"]):
        full[e][rows] = scale(manifest, layer) * (b[e] @ a[e])
    return full


def bias_delta(manifest: dict, tensors: dict, layer: str) -> np.ndarray:
    """§4.4: the bias change scale·lora_bias, every output."""
    return scale(manifest, layer) * array(*tensors[f"{layer}.lora_bias"])


def dora_merged(manifest: dict, tensors: dict, layer: str, weight: np.ndarray) -> np.ndarray:
    """§4.5 with W in [out, in]: W' = diag(m/n)·V, a zero row staying zero."""
    v = weight + delta(manifest, tensors, layer)
    norms = np.sqrt((v * v).sum(axis=1))
    m = array(*tensors[f"{layer}.magnitude"])
    factor = np.divide(m, norms, out=np.zeros_like(norms), where=norms > 0)
    return factor[:, None] * v


def fingerprint(file: Path) -> str:
    """§6 for a single-file checkpoint."""
    _, tensors = read_container(Path(file).read_bytes())
    lines = []
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        dtype, shape, data = tensors[name]
        sample = data if len(data) <= 8192 else data[:4096] + data[-4096:]
        lines.append(f"{name}\t{dtype}\t{','.join(map(str, shape))}\t"
                     f"{hashlib.sha256(sample).hexdigest()}\n")
    return "lfp1:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
