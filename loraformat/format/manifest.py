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
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR, SUPPORTED_MINOR = 1, 0

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

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)$")


def tensor_key(path: str, role: str) -> str:
    return f"{path}.{role}"


def split_key(key: str) -> tuple[str, str]:
    """``'a.b.lora_A'`` → ``('a.b', 'lora_A')``; unknown roles give ``(key, '')``."""
    path, _, role = key.rpartition(".")
    if role in LAYER_ROLES or role == ROLE_REPLACEMENT:
        return path, role
    return key, ""


@functools.cache
def schema() -> dict[str, Any]:
    text = resources.files("loraformat.format").joinpath("schemas/adapter.v1.schema.json")
    return json.loads(text.read_text(encoding="utf-8"))


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def parse_version(version: object) -> tuple[int, int] | None:
    if not isinstance(version, str):
        return None
    match = _VERSION_RE.match(version)
    return (int(match.group(1)), int(match.group(2))) if match else None


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


def schema_problems(manifest: dict[str, Any]) -> list[str]:
    """Every schema violation, as ``'<json path>: <message>'``.

    A manifest of a newer *minor* version may carry members this reader does not know; those are
    ignored (the forward-compatibility rule), every other violation is reported.
    """
    version = parse_version(manifest.get("format_version")) or (SUPPORTED_MAJOR, SUPPORTED_MINOR)
    newer_minor = version[1] > SUPPORTED_MINOR
    problems = []
    for error in sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        if newer_minor and error.validator == "additionalProperties":
            continue
        where = "/".join(str(p) for p in error.absolute_path) or "(manifest)"
        message = error.message
        if error.validator == "additionalProperties":
            known = set(error.schema.get("properties", {}))
            unknown = sorted(k for k in error.instance if k not in known and not k.startswith("x-"))
            message = (
                f"unknown member {', '.join(map(repr, unknown))} (format {FORMAT_VERSION} allows "
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
