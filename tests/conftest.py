"""Shared fixtures: tiny checkpoints built once per test session (no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Every test traces its exports (a graph cache in the user's home could hide a tracing bug, and
# tests must not write there); tests/test_graph_cache.py turns the cache on in a temporary folder.
os.environ["LORAFORMAT_CACHE"] = "off"

import tiny_models


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_checkpoint("gpt2")`` → path of a tiny saved transformers checkpoint (cached)."""
    cache: dict[tuple, Path] = {}

    def build(architecture: str, **kwargs) -> Path:
        key = (architecture, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{architecture}-base")
            cache[key] = tiny_models.BUILDERS[architecture](out, **kwargs)
        return cache[key]

    return build
