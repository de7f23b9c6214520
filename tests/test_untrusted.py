"""Untrusted inputs: reading an adapter never runs code and never leaves its directory.

- A PEFT ``adapter_model.bin`` or a loralib ``.pt`` holding a malicious pickle (a ``__reduce__``
  that would create a marker file) is refused by ``torch.load(weights_only=True)`` with a one-line
  message, through every command that reads it, and the marker is never created. The payload is
  shown to work when unpickled normally, so the test can fail.
- The source is scanned with ``ast``: every ``torch.load`` call passes ``weights_only=True``, and
  nothing calls ``pickle.load(s)``, ``pickle.Unpickler``, ``numpy.load(allow_pickle=True)`` or
  ``torch.load`` through another name.
- Symbolic links inside an input directory that lead outside it are refused by every directory
  reader (loraformat, PEFT, MLX), as §9 of spec/FORMAT.md requires for loraformat adapters.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file
from test_cli_errors import assert_one_line_error, run
from test_kill import random_adapter

import loraformat

PACKAGE = Path(loraformat.__file__).parent


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_pickle(path: Path, obj: object, how: str) -> None:
    if how == "torch-zip":
        torch.save(obj, path)
    elif how == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as handle:
            pickle.dump(obj, handle)  # the default protocol (torch warns about it)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    """(base, loraformat adapter, its PEFT form, its MLX form)."""
    root = tmp_path_factory.mktemp("untrusted")
    base = tiny_checkpoint("gpt2")
    native = random_adapter(base, root / "adapter")
    for fmt in ("peft", "mlx"):
        code, _, err = run("convert", native, "-o", root / fmt, "--to", fmt, "--base", base)
        assert code == 0, err
    return base, native, root / "peft", root / "mlx"


PICKLES = ["torch-zip", "torch-legacy", "plain-pickle"]


@pytest.mark.slow
@pytest.mark.parametrize("how", PICKLES)
def test_payload_runs_when_unpickled_unsafely(tmp_path, how):
    """The control: the same payload does create its marker under an unsafe load."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.bin"
    _write_pickle(path, {"x": Payload(marker)}, how)
    # in a child process: this *is* the unsafe load the library must never do
    code = (f"import pickle; pickle.load(open({str(path)!r}, 'rb'))" if how == "plain-pickle"
            else f"import torch; torch.load({str(path)!r}, weights_only=False)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", PICKLES)
def test_malicious_peft_bin_refused(adapters, tmp_path, how):
    base, _, peft, _ = adapters
    marker = tmp_path / "marker"
    evil = shutil.copytree(peft, tmp_path / "evil-peft")
    tensors = {k: torch.from_numpy(v) for k, v in
               load_file(evil / "adapter_model.safetensors").items()}
    (evil / "adapter_model.safetensors").unlink()
    _write_pickle(evil / "adapter_model.bin", {**tensors, "evil": Payload(marker)}, how)
    needle = "refused to unpickle: not loadable with torch.load(weights_only=True)"
    for argv in (
        ["convert", evil, "-o", tmp_path / "out1"],
        ["convert", evil, "-o", tmp_path / "out2", "--from", "peft", "--base", base],
        ["merge", base, evil, "-o", tmp_path / "out3"],
    ):
        assert_one_line_error(run(*argv, inputs=[evil]), evil / "adapter_model.bin", needle)
        assert not marker.exists()
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))
    # the real executable too: nothing else on stderr (no warning from torch's unpickler)
    cli = [sys.executable, "-c", "from loraformat.cli import main; main()"]
    done = subprocess.run([*cli, "convert", str(evil), "-o", str(tmp_path / "out4")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert_one_line_error((1, "", done.stderr), evil / "adapter_model.bin", needle)
    assert not marker.exists()


@pytest.mark.parametrize("how", PICKLES)
def test_malicious_loralib_pt_refused(adapters, tmp_path, how):
    base = adapters[0]
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    state = {"transformer.h.0.attn.c_attn.lora_A": torch.zeros(4, 32),
             "transformer.h.0.attn.c_attn.lora_B": torch.zeros(96, 4),
             "evil": Payload(marker)}
    _write_pickle(evil, state, how)
    needle = "refused to unpickle: not loadable with torch.load(weights_only=True)"
    for extra in ([], ["--from", "loralib"]):  # detected by suffix, or named
        argv = ["convert", evil, "-o", tmp_path / "out", "--alpha", "8", "--base", base, *extra]
        assert_one_line_error(run(*argv, inputs=[evil]), evil, needle)
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_benign_legacy_bin_still_reads(adapters, tmp_path):
    """weights_only=True still reads a plain state dict (the refusal is not blanket)."""
    base, _, peft, _ = adapters
    legacy = shutil.copytree(peft, tmp_path / "legacy-peft")
    tensors = {k: torch.from_numpy(v) for k, v in
               load_file(legacy / "adapter_model.safetensors").items()}
    (legacy / "adapter_model.safetensors").unlink()
    torch.save(tensors, legacy / "adapter_model.bin")
    code, _, err = run("convert", legacy, "-o", tmp_path / "out", "--base", base,
                       inputs=[legacy])
    assert code == 0, err


# -- the source never unpickles -----------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _unsafe_calls(tree: ast.AST) -> tuple[list[str], int]:
    """(problems, number of torch.load calls) in one module."""
    problems, loads = [], 0
    aliases = {}  # local name → what it imports (from torch import load as tl)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "numpy"):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        if head in aliases:
            name = aliases[head] + ("." + rest if rest else "")
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"line {node.lineno}: {name}"
        if name == "torch.load":
            loads += 1
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where} without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load",
                      "cloudpickle.load", "joblib.load", "torch.serialization.load"):
            problems.append(where)
        elif name in ("np.load", "numpy.load"):
            value = keywords.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                problems.append(f"{where} with allow_pickle")
    return problems, loads


def test_scan_finds_unsafe_calls():
    """The scanner itself: it flags what it must (else the next test proves nothing)."""
    bad = ast.parse(
        "import torch\nimport pickle\nimport numpy as np\nfrom torch import load as tl\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\ntl(p)\npickle.loads(b)\n"
        "np.load(p, allow_pickle=True)\ntorch.load(p, map_location='cpu', weights_only=True)\n"
    )
    problems, loads = _unsafe_calls(bad)
    assert loads == 4
    assert len(problems) == 5, problems


def test_source_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "plugins").rglob("*.py"))
    assert len(files) > 30
    found, loads = [], 0
    for file in files:
        problems, n = _unsafe_calls(ast.parse(file.read_text(encoding="utf-8"), str(file)))
        loads += n
        found += [f"{file.relative_to(PACKAGE.parent)} {p}" for p in problems]
    assert not found, found
    assert loads >= 1  # the one sanctioned reader: interchange._common.torch_load_weights_only


# -- symbolic links out of an input directory ---------------------------------------------------


MEMBERS = [
    ("loraformat", "adapter.json"),
    ("loraformat", "adapter.safetensors"),
    ("peft", "adapter_config.json"),
    ("peft", "adapter_model.safetensors"),
    ("mlx", "adapter_config.json"),
    ("mlx", "adapters.safetensors"),
]


@pytest.mark.parametrize(("fmt", "member"), MEMBERS, ids=lambda v: v)
def test_symlink_out_of_an_input_directory_refused(adapters, tmp_path, fmt, member):
    base, native, peft, mlx = adapters
    source = {"loraformat": native, "peft": peft, "mlx": mlx}[fmt]
    linked = shutil.copytree(source, tmp_path / "linked")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(linked / member, outside / member)
    os.symlink(outside / member, linked / member)
    to = "peft" if fmt != "peft" else "loraformat"
    runs = [["convert", linked, "-o", tmp_path / "out", "--to", to, "--base", base,
             "--from", fmt]]
    if fmt != "mlx":  # merge reads loraformat and PEFT adapters
        runs.append(["merge", base, linked, "-o", tmp_path / "merged"])
    for argv in runs:
        assert_one_line_error(run(*argv, inputs=[linked, outside]), linked / member,
                              "symbolic link points outside the adapter directory")
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_symlink_inside_the_directory_is_fine(adapters, tmp_path):
    """A link that stays inside the adapter directory is harmless and accepted."""
    base, _, peft, _ = adapters
    linked = shutil.copytree(peft, tmp_path / "linked")
    (linked / "adapter_model.safetensors").rename(linked / "real.safetensors")
    os.symlink("real.safetensors", linked / "adapter_model.safetensors")
    code, _, err = run("convert", linked, "-o", tmp_path / "out", "--base", base,
                       inputs=[linked])
    assert code == 0, err


def test_hugging_face_hub_cache_layout_is_accepted(adapters, tmp_path):
    """The hub cache stores files as <repo>/blobs/<hash> and links them from
    <repo>/snapshots/<revision>/: that link stays inside the repo and is accepted; a link from a
    snapshot to anywhere else is still refused."""
    base, _, peft, _ = adapters
    repo = tmp_path / "models--someone--adapter"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(peft.iterdir()):
        blob = repo / "blobs" / f"sha-{file.name}"
        shutil.copy(file, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    code, _, err = run("convert", snapshot, "-o", tmp_path / "out", "--base", base,
                       inputs=[repo])
    assert code == 0, err

    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(repo / "blobs" / "sha-adapter_model.safetensors", elsewhere)
    (snapshot / "adapter_model.safetensors").unlink()
    os.symlink(elsewhere, snapshot / "adapter_model.safetensors")
    assert_one_line_error(
        run("convert", snapshot, "-o", tmp_path / "out2", "--base", base, inputs=[repo]),
        snapshot / "adapter_model.safetensors",
        "symbolic link points outside the adapter directory",
    )
