"""The manifest: constants of the v1 format, the schema, and the version rule.

Torch-free on purpose: ``inspect`` and ``validate`` import only this, the safetensors reader and
numpy.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

FORMAT_NAME = "loraformat"
#: The newest version this reader implements; a writer writes the lowest version that can express
#: its file (:func:`lowest_version`), so most adapters stay readable by 1.0 readers.
FORMAT_VERSION = "1.2"
BASE_VERSION = "1.0"
SUPPORTED_MAJOR, SUPPORTED_MINOR = 1, 2
#: Largest expert count of a stacked-expert layer (spec §4.7).
MAX_EXPERTS = 65_536
#: Members that exist only from a minor version on: (where, member) → minor. A manifest declaring
#: an older version MUST NOT use them (spec §8 step 3).
MEMBER_SINCE = {("layer", "experts"): 2}
#: Largest adapter.json accepted: the same bound as a safetensors header (spec §9).
MAX_MANIFEST_BYTES = 104_857_600

MANIFEST_FILE = "adapter.json"
TENSORS_FILE = "adapter.safetensors"
#: Key of the manifest in a single-file adapter's safetensors ``__metadata__``.
METADATA_KEY = "loraformat"

# Tensor roles: every tensor key is "<path>.<role>".
ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_MAGNITUDE = "magnitude"
ROLE_BIAS = "lora_bias"
ROLE_REPLACEMENT = "replacement"
LAYER_ROLES = (ROLE_A, ROLE_B, ROLE_MAGNITUDE, ROLE_BIAS)

SCALING_RULES = ("alpha/r", "alpha/sqrt(r)")

# Decimal, no leading zeros; matched against the whole string (re.fullmatch: "$" alone would
# also match before a final newline).
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


def tensor_key(path: str, role: str) -> str:
    return f"{path}.{role}"


_SEGMENT_RE = re.compile(r"[A-Za-z0-9_\-]+")


def is_future_role(key: str, layers: Any) -> bool:
    """spec §8 step 4: ``<layer>.<role>`` with ``<layer>`` a declared layer path and ``<role>``
    a segment of §3's grammar that is none of §3's roles (``replacement`` included)."""
    layer, _, role = key.rpartition(".")
    return (
        layer in layers
        and _SEGMENT_RE.fullmatch(role) is not None
        and role not in LAYER_ROLES
        and role != ROLE_REPLACEMENT
    )


@functools.cache
def schema() -> dict[str, Any]:
    text = resources.files("loraformat.format").joinpath("schemas/adapter.v1.schema.json")
    return json.loads(text.read_text(encoding="utf-8"))


@functools.cache
def _validator() -> Any:
    import jsonschema

    base = jsonschema.Draft202012Validator
    # Two places where Python's jsonschema departs from the format's reading of the schema
    # (spec §2): "integer" is an integer *token* (4.0 and 4e0 are refused, as in strictly typed
    # readers), and a pattern's "$" means the end of the string, as in ECMA-262 (Python's re.search
    # would also accept a final newline).
    types = base.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)
    )

    def pattern(validator: Any, regex: str, instance: Any, _schema: Any) -> Any:
        if isinstance(instance, str) and not re.search(_ecma_end(regex), instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {regex!r}")

    cls = jsonschema.validators.extend(base, {"pattern": pattern}, type_checker=types)
    return cls(schema())


def _ecma_end(regex: str) -> str:
    """ECMA-262 ``$`` (end of input) in Python spelling: ``\\Z``."""
    return regex[:-1] + r"\Z" if regex.endswith("$") and not regex.endswith(r"\$") else regex


def parse_version(version: object) -> tuple[int, int] | None:
    if not isinstance(version, str):
        return None
    match = _VERSION_RE.fullmatch(version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_newer_minor(manifest: dict[str, Any]) -> bool:
    """True for 1.n with n > the minor version this reader implements (spec §8)."""
    version = parse_version(manifest.get("format_version"))
    return version is not None and version[0] == SUPPORTED_MAJOR and version[1] > SUPPORTED_MINOR


def version_at_least(manifest: dict[str, Any], minor: int) -> bool:
    return declared_minor(manifest) >= minor


def declared_minor(manifest: dict[str, Any]) -> int:
    """The minor version the manifest declares (0 when it declares none readable)."""
    version = parse_version(manifest.get("format_version")) or (SUPPORTED_MAJOR, 0)
    return version[1]


def check_version(manifest: object) -> str | None:
    """A refusal message when this reader must not read the manifest, else ``None``."""
    if not isinstance(manifest, dict):
        return "(manifest): not a JSON object"
    if manifest.get("format") != FORMAT_NAME:
        return f"format: not a loraformat manifest (format is {manifest.get('format')!r})"
    version = parse_version(manifest.get("format_version"))
    if version is None:
        return f"format_version: {manifest.get('format_version')!r} is not 'MAJOR.MINOR'"
    if version[0] > SUPPORTED_MAJOR:
        return (
            f"format_version: {version[0]}.{version[1]} is a newer major version than this "
            f"reader supports ({SUPPORTED_MAJOR}.x); upgrade loraformat"
        )
    if version[0] < SUPPORTED_MAJOR:
        return f"format_version: {version[0]}.{version[1]} is not a version this reader knows"
    return None


# -- fast path ------------------------------------------------------------------------------------
# jsonschema needs ~0.15 s to import and ~0.2 ms per layer to validate; inspect must answer a
# 1,000-layer adapter in well under a second. ``conforms`` decides the same question as the schema
# in plain Python; only when it says no does jsonschema run, to explain. tests/test_fuzz_format.py
# checks that the two agree on every fuzzed manifest.

_PATH_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_SCHEMA_VERSION_RE = re.compile(r"^1\.(0|[1-9][0-9]*)$")
_FINGERPRINT_RE = re.compile(r"^lfp1:[0-9a-f]{64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ANY_RE = re.compile(r"[\s\S]*")
_TOP = frozenset(
    {"format", "format_version", "base_model", "scaling", "rank", "alpha", "layers",
     "replacements", "tensors_sha256", "provenance"}
)
_TOP_REQUIRED = ("format", "format_version", "base_model", "scaling", "alpha", "layers",
                 "tensors_sha256")
_BASE = frozenset({"architecture", "name", "fingerprint"})
_LAYER = frozenset({"rank", "alpha", "in_features", "out_features", "kind", "out_rows", "dora",
                    "lora_bias", "experts"})


def _is_int(v: object) -> bool:
    # spec §2: an integer is written as an integer token; the JSON parser gives int only for those.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int_in(v: object, lo: int, hi: int | None = None) -> bool:
    return _is_int(v) and v >= lo and (hi is None or v <= hi)


def _str_match(v: object, pattern: re.Pattern[str], lo: int = 0, hi: int | None = None) -> bool:
    return (
        isinstance(v, str)
        and lo <= len(v)
        and (hi is None or len(v) <= hi)
        and pattern.fullmatch(v) is not None
    )


def _members_ok(obj: dict[str, Any], known: frozenset[str], lenient: bool) -> bool:
    return lenient or all(k in known or k.startswith("x-") for k in obj)


def _layer_ok(entry: object, lenient: bool) -> bool:
    if not isinstance(entry, dict) or not _members_ok(entry, _LAYER, lenient):
        return False
    if not all(_int_in(entry.get(k), 1, 16777216) for k in ("in_features", "out_features")):
        return False
    if "rank" in entry and not _int_in(entry["rank"], 1, 65536):
        return False
    if "alpha" in entry and not _is_num(entry["alpha"]):
        return False
    if "kind" in entry and entry["kind"] not in ("linear", "embedding"):
        return False
    if "experts" in entry and not _int_in(entry["experts"], 1, MAX_EXPERTS):
        return False
    for flag in ("dora", "lora_bias"):
        if flag in entry and not isinstance(entry[flag], bool):
            return False
    if "out_rows" in entry:
        rows = entry["out_rows"]
        if not isinstance(rows, list) or not rows:
            return False
        for r in rows:
            if not (isinstance(r, list) and len(r) == 2 and _int_in(r[0], 0) and _int_in(r[1], 1)):
                return False
    return True


def conforms(manifest: object, *, lenient: bool = False) -> bool:
    """True when ``manifest`` satisfies the v1 schema (``lenient``: unknown members ignored)."""
    if not isinstance(manifest, dict) or not all(k in manifest for k in _TOP_REQUIRED):
        return False
    if not _members_ok(manifest, _TOP, lenient):
        return False
    if manifest["format"] != FORMAT_NAME or isinstance(manifest["format"], bool):
        return False
    if not _str_match(manifest["format_version"], _SCHEMA_VERSION_RE):
        return False
    base = manifest["base_model"]
    if not isinstance(base, dict) or not _members_ok(base, _BASE, lenient):
        return False
    if not _str_match(base.get("architecture"), _ANY_RE, 1, 128):
        return False
    if "name" in base and not (isinstance(base["name"], str) and len(base["name"]) <= 1024):
        return False
    if "fingerprint" in base and not _str_match(base["fingerprint"], _FINGERPRINT_RE):
        return False
    if manifest["scaling"] not in SCALING_RULES or not isinstance(manifest["scaling"], str):
        return False
    if "rank" in manifest and not _int_in(manifest["rank"], 1, 65536):
        return False
    if not _is_num(manifest["alpha"]):
        return False
    layers = manifest["layers"]
    if not isinstance(layers, dict):
        return False
    for path, entry in layers.items():
        if not _str_match(path, _PATH_RE, 1, 512) or not _layer_ok(entry, lenient):
            return False
    if "replacements" in manifest:
        names = manifest["replacements"]
        if not isinstance(names, list) or not all(_str_match(n, _PATH_RE, 1, 512) for n in names):
            return False
        if len(set(names)) != len(names):
            return False
    if not _str_match(manifest["tensors_sha256"], _SHA_RE):
        return False
    return "provenance" not in manifest or isinstance(manifest["provenance"], dict)


def schema_problems(manifest: dict[str, Any]) -> list[str]:
    """Every schema violation, as ``'<json path>: <message>'``.

    A manifest of a newer *minor* version may carry members this reader does not know; those are
    ignored (the forward-compatibility rule), every other violation is reported.
    """
    version = parse_version(manifest.get("format_version")) or (SUPPORTED_MAJOR, SUPPORTED_MINOR)
    newer_minor = version[1] > SUPPORTED_MINOR
    if conforms(manifest, lenient=newer_minor):
        return []
    return jsonschema_problems(manifest, newer_minor=newer_minor)


def jsonschema_problems(manifest: dict[str, Any], *, newer_minor: bool = False) -> list[str]:
    """The schema check by jsonschema itself: slow, but its messages say what is wrong."""
    problems = []
    version = manifest.get("format_version")
    version = version if parse_version(version) else FORMAT_VERSION
    for error in sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        if newer_minor and error.validator == "additionalProperties":
            continue
        where = "/".join(str(p) for p in error.absolute_path) or "(manifest)"
        message = error.message
        if error.validator == "additionalProperties":
            known = set(error.schema.get("properties", {}))
            unknown = sorted(k for k in error.instance if k not in known and not k.startswith("x-"))
            message = (
                f"unknown member {', '.join(map(repr, unknown))} (format {version} allows "
                "only the members of spec/FORMAT.md, and 'x-' extensions)"
            )
        if len(message) > 200:
            message = message[:200] + "..."
        problems.append(f"{where}: {message}")
    return problems


def dumps(manifest: dict[str, Any], *, compact: bool = False) -> str:
    """Canonical text: sorted keys; pretty in a directory, compact inside a single file."""
    if compact:
        return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
