"""Every command's failure: one line on stderr naming the file and the problem, exit status 1.

Each command (inspect, validate, merge, unmerge, export, convert, stack, subtract, scale, reduce,
combine, extract, generate, plugins) is run through the CLI entry point
(:func:`loraformat.cli.main`, exactly what the ``loraformat`` executable runs) against missing
files, bad JSON, truncated safetensors, the wrong architecture and an existing output without
``--overwrite``. Usage errors exit 2 (click's message); ``--debug`` adds the traceback. Then the
refusals of issue 8, each with its message: absurd header size, a rank larger than the layer,
shapes whose byte size disagrees with the file, NaN/Inf (``merge`` refuses unless
``--allow-nonfinite``), a base fingerprint mismatch (``--force`` overrides), an existing output
(``--overwrite`` replaces it). Every run hashes its input files before and after: inputs are
never modified, whether the command succeeds or fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
from pathlib import Path

import cli_harness
import numpy as np
import pytest
import tiny_models
from test_kill import random_adapter

from loraformat import LoraLayer
from loraformat.format.adapter import Adapter, load


def _hashes(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        if not root.exists():
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def run(*args: object, inputs: list[Path] = ()) -> tuple[int, str, str]:
    """Run ``loraformat ARGS`` in process → (exit status, stdout, stderr); inputs unchanged."""
    before = _hashes(list(inputs))
    result = cli_harness.run_cli(*args)
    assert _hashes(list(inputs)) == before, f"an input was modified by {args}"
    return result.code, result.out, result.err


def assert_one_line_error(result: tuple[int, str, str], path: Path | str, *needles: str,
                          prefix: str = "error: ") -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(prefix), line
    assert "internal error" not in line and "Traceback" not in err, line
    assert str(path) in line, (str(path), line)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# -- inputs -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    root: Path
    base: Path
    llama: Path
    other: Path  # a GPT-2 of the same shape, different weights: another fingerprint
    adapter: Path
    llama_adapter: Path
    bad_json: Path
    truncated: Path
    bad_json_base: Path
    truncated_base: Path
    exists: Path
    exists_onnx: Path
    garbage_onnx: Path
    missing: Path
    out_count: int = 0

    def out(self, suffix: str = "") -> Path:
        self.out_count += 1
        return self.root / "out" / f"o{self.out_count}{suffix}"

    @property
    def inputs(self) -> list[Path]:
        return [self.base, self.llama, self.other, self.adapter, self.llama_adapter,
                self.bad_json, self.truncated, self.bad_json_base, self.truncated_base,
                self.exists, self.exists_onnx, self.garbage_onnx]


def _truncate(file: Path, drop: int = 100) -> None:
    file.write_bytes(file.read_bytes()[:-drop])


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "out").mkdir()
    base = tiny_checkpoint("gpt2")
    llama = tiny_checkpoint("llama")
    adapter = random_adapter(base, root / "adapter")
    bad_json = shutil.copytree(adapter, root / "bad-json")
    (bad_json / "adapter.json").write_text("{not json", encoding="utf-8")
    truncated = shutil.copytree(adapter, root / "truncated")
    _truncate(truncated / "adapter.safetensors")
    bad_json_base = shutil.copytree(base, root / "bad-json-base")
    (bad_json_base / "config.json").write_text("{oops", encoding="utf-8")
    truncated_base = shutil.copytree(base, root / "truncated-base")
    _truncate(truncated_base / "model.safetensors")
    exists = root / "out" / "exists"
    exists.mkdir()
    (exists / "keep").write_text("previous output")
    exists_onnx = root / "out" / "exists.onnx"
    exists_onnx.write_bytes(b"previous output")
    garbage_onnx = root / "garbage.onnx"
    garbage_onnx.write_bytes(b"\x08\x07not a protobuf" * 8)
    return Env(
        root=root, base=base, llama=llama, other=tiny_models.gpt2(root / "other", seed=3),
        adapter=adapter, llama_adapter=random_adapter(llama, root / "llama-adapter"),
        bad_json=bad_json, truncated=truncated, bad_json_base=bad_json_base,
        truncated_base=truncated_base, exists=exists, exists_onnx=exists_onnx,
        garbage_onnx=garbage_onnx, missing=root / "missing",
    )


# -- the matrix: command × bad input -------------------------------------------------------------

# argv(adapter, base, out) per command; ".onnx" outputs where the command writes ONNX.
COMMANDS = {
    "inspect": lambda a, b, o: ["inspect", a],
    "validate": lambda a, b, o: ["validate", a],
    "merge": lambda a, b, o: ["merge", b, a, "-o", o],
    "merge-onnx": lambda a, b, o: ["merge", b, a, "-o", f"{o}.onnx"],
    "unmerge": lambda a, b, o: ["unmerge", b, a, "-o", o],
    "export": lambda a, b, o: ["export", b, "-o", f"{o}.onnx"],
    "convert": lambda a, b, o: ["convert", a, "-o", o, "--to", "peft", "--base", b],
    "stack": lambda a, b, o: ["stack", a, a, "-o", o],
    "subtract": lambda a, b, o: ["subtract", a, a, "-o", o],
    "scale": lambda a, b, o: ["scale", a, "0.5", "-o", o],
    "reduce": lambda a, b, o: ["reduce", a, "--rank", "2", "-o", o],
    "combine": lambda a, b, o: ["combine", a, a, "-o", o],
    "extract": lambda a, b, o: ["extract", b, b, "--rank", "2", "-o", o],
}
READS_ADAPTER = {"inspect", "validate", "merge", "merge-onnx", "unmerge", "convert", "stack",
                 "subtract", "scale", "reduce", "combine"}
READS_BASE = {"merge", "merge-onnx", "unmerge", "export", "convert", "extract"}
WRITES = set(COMMANDS) - {"inspect", "validate"}


def _cases():
    for command in COMMANDS:
        kinds = []
        if command in READS_ADAPTER:
            kinds += ["missing adapter", "bad JSON adapter", "truncated adapter"]
        if command in READS_BASE:
            kinds += ["missing base", "bad JSON base", "truncated base"]
        if command not in ("inspect", "validate", "scale", "reduce", "export"):
            kinds.append("wrong architecture")
        if command in WRITES:
            kinds.append("output exists")
        for kind in kinds:
            yield pytest.param(command, kind, id=f"{command}-{kind.replace(' ', '_')}")


@pytest.mark.parametrize(("command", "kind"), list(_cases()))
def test_failure_is_one_line_naming_the_file(env: Env, command: str, kind: str) -> None:
    a, b, o = env.adapter, env.base, env.out()
    expect: tuple[Path, tuple[str, ...]]
    if kind == "missing adapter":
        a = env.missing
        expect = (a, ("no such file or directory",))
    elif kind == "bad JSON adapter":
        a = env.bad_json
        expect = (a / "adapter.json", ("manifest is not valid JSON",))
    elif kind == "truncated adapter":
        a = env.truncated
        expect = (a / "adapter.safetensors", ("truncated safetensors file",))
    elif kind == "missing base":
        b = env.missing
        expect = (b, ("base checkpoint not found",))
    elif kind == "bad JSON base":
        b = env.bad_json_base
        expect = (b / "config.json", ("not valid JSON",))
    elif kind == "truncated base":
        b = env.truncated_base
        expect = (b / "model.safetensors", ("truncated safetensors file",))
    elif kind == "wrong architecture":
        if command == "extract":  # a GPT-2 "fine-tune" of a LLaMA base
            argv = ["extract", env.base, env.llama, "--rank", "2", "-o", o]
            expect = (env.base, ("lacks base tensor",))
        elif command in ("stack", "subtract", "combine"):
            argv = COMMANDS[command](a, b, o)
            argv[2] = env.llama_adapter  # the second adapter is for another architecture
            expect = (env.llama_adapter, ("architecture 'llama' differs from 'gpt2'",))
        elif command == "convert":
            a = env.llama_adapter
            expect = (b, ("base is 'gpt2' but the adapter is for 'llama'",))
        else:
            a = env.llama_adapter
            expect = (a, ("adapter is for architecture 'llama'", "'gpt2'"))
    elif kind == "output exists":
        o = env.exists
        expect = (o, ("output already exists (use --overwrite to replace it)",))
        if command in ("merge-onnx", "export"):
            o = env.exists.with_suffix("")  # argv adds ".onnx": env.exists_onnx
            expect = (env.exists_onnx, expect[1])
    if not (kind == "wrong architecture" and command in ("extract", "stack", "subtract",
                                                         "combine")):
        argv = COMMANDS[command](a, b, o)
    result = run(*argv, inputs=env.inputs)
    if command == "validate":  # validate prints "<file>: <problem>" lines, without "error: "
        assert_one_line_error(result, expect[0], *expect[1], prefix=str(expect[0]))
    else:
        assert_one_line_error(result, expect[0], *expect[1])
    if kind != "output exists":
        assert not o.exists() and not Path(f"{o}.onnx").exists()  # nothing written
    assert (env.exists / "keep").read_text() == "previous output"
    assert env.exists_onnx.read_bytes() == b"previous output"


def test_onnx_inputs(env: Env) -> None:
    """ONNX-reading commands: a missing or unparsable model is one line naming it."""
    missing = env.root / "missing.onnx"
    cases = [
        (["merge", missing, env.adapter, "-o", env.out(".onnx")], missing, "ONNX model not found"),
        (["merge", env.garbage_onnx, env.adapter, "-o", env.out(".onnx")], env.garbage_onnx,
         "cannot read the ONNX model"),
        (["unmerge", env.garbage_onnx, env.adapter, "-o", env.out(".onnx")], env.garbage_onnx,
         "cannot read the ONNX model"),
        (["generate", missing, "--prompt-ids", "1,2"], missing, "no such ONNX model"),
        (["generate", env.garbage_onnx, "--prompt-ids", "1,2"], env.garbage_onnx,
         "is a file of no format loraformat knows"),
    ]
    for argv, path, needle in cases:
        assert_one_line_error(run(*argv, inputs=env.inputs), path, needle)


def test_output_under_a_file(env: Env) -> None:
    """A missing output folder is made (tests/test_walkthrough.py); one under a file cannot be."""
    out = env.base / "config.json" / "deep" / "merged"
    assert_one_line_error(run("merge", env.base, env.adapter, "-o", out, inputs=env.inputs),
                          out, "config.json is a file, not a folder to write into")


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"merge-onnx"} | {"generate",
                                                                            "plugins"}))
def test_usage_errors_exit_2(command: str) -> None:
    code, _, err = run(command, "--no-such-option")
    assert code == 2, err
    assert err.startswith(f"Usage: loraformat {command} ") and "\nError: " in err, err
    assert "Traceback" not in err


def test_usage_error_missing_output_and_wrong_combination(env: Env) -> None:
    code, _, err = run("merge", env.base, env.adapter)
    assert code == 2 and "Missing option '-o' / '--output'" in err
    code, _, err = run("unmerge", env.base, env.adapter, "-o", env.out(".onnx"))
    assert code == 2 and "unmerge writes a checkpoint" in err
    code, _, err = run("reduce", env.adapter, "-o", env.out())
    assert code == 2 and "give --rank, --energy or --rank-pattern" in err


def test_plugins_lists_and_succeeds() -> None:
    code, out, err = run("plugins", "--json")
    assert code == 0, err
    names = {arch for record in json.loads(out) for arch in record["architectures"]}
    assert {"gpt2", "llama", "bert", "vit"} <= names


@pytest.mark.parametrize("command", ["merge", "convert", "stack", "inspect", "extract"])
def test_debug_shows_the_traceback(env: Env, command: str) -> None:
    argv = COMMANDS[command](env.missing, env.missing, env.out())
    code, _, err = run("--debug", *argv, inputs=env.inputs)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert "loraformat.errors.LoraformatError" in err
    assert err.strip().splitlines()[-1].startswith(f"error: {env.missing}")
    # and without --debug, no traceback
    assert "Traceback" not in run(*argv)[2]


# -- the refusals of issue 8 --------------------------------------------------------------------


def test_absurd_header_size(env: Env) -> None:
    bad = shutil.copytree(env.adapter, env.root / "huge-header")
    tensors = bad / "adapter.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    for argv in (["inspect", bad], ["merge", env.base, bad, "-o", env.out()],
                 ["stack", bad, env.adapter, "-o", env.out()]):
        assert_one_line_error(run(*argv, inputs=[bad]), tensors,
                              "safetensors header size 1099511627776 exceeds the "
                              "104857600-byte limit")
    code, _, err = run("validate", bad)
    assert code == 1 and "exceeds the 104857600-byte limit" in err


def test_rank_larger_than_the_layer(env: Env) -> None:
    layer = LoraLayer(np.ones((40, 32), np.float32), np.ones((96, 40), np.float32), 8.0, 32, 96)
    bad = Adapter.from_layers("gpt2", {"transformer.h.0.attn.c_attn": layer}).save(
        env.root / "rank-too-large"
    )
    needle = "layers/transformer.h.0.attn.c_attn: rank 40 exceeds the layer's smaller dimension 32"
    for argv in (["inspect", bad], ["merge", env.base, bad, "-o", env.out()],
                 ["reduce", bad, "--rank", "2", "-o", env.out()],
                 ["convert", bad, "--to", "peft", "-o", env.out()]):
        assert_one_line_error(run(*argv, inputs=[bad]), bad / "adapter.json", needle)


def test_adapter_shape_disagrees_with_the_base(env: Env) -> None:
    layer = LoraLayer(np.ones((4, 16), np.float32), np.ones((96, 4), np.float32), 8.0, 16, 96)
    bad = Adapter.from_layers("gpt2", {"transformer.h.0.attn.c_attn": layer}).save(
        env.root / "wrong-shape"
    )
    for out in (env.out(), env.out(".onnx")):
        assert_one_line_error(
            run("merge", env.base, bad, "-o", out, inputs=[bad, env.base]), bad,
            "shape mismatch at layer 'transformer.h.0.attn.c_attn': adapter is 16→96 (in→out), "
            "base transformer.h.0.attn.c_attn.weight is 32→96",
        )
    # convert with --base checks shapes too, whatever the target format
    for target in ("peft", "loraformat"):
        assert_one_line_error(
            run("convert", bad, "--to", target, "--base", env.base, "-o", env.out(),
                inputs=[bad, env.base]),
            bad, "'transformer.h.0.attn.c_attn'", "16→96",
        )


def test_adapter_layer_missing_from_the_base(env: Env) -> None:
    layer = LoraLayer(np.ones((4, 32), np.float32), np.ones((96, 4), np.float32), 8.0, 32, 96)
    bad = Adapter.from_layers("gpt2", {"transformer.h.0.attn.nothere": layer}).save(
        env.root / "no-such-layer"
    )
    assert_one_line_error(
        run("merge", env.base, bad, "-o", env.out(), inputs=[bad, env.base]), bad,
        "adapter layer 'transformer.h.0.attn.nothere' is not a layer of the base",
    )


def test_shape_bytes_disagree_with_the_file(env: Env) -> None:
    bad = shutil.copytree(env.adapter, env.root / "shape-bytes")
    tensors = bad / "adapter.safetensors"
    data = tensors.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    name = sorted(k for k in header if k != "__metadata__")[0]
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [rows, cols + 1]
    raw = json.dumps(header).encode()
    tensors.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])
    begin, end = header[name]["data_offsets"]
    needle = (f"tensor '{name}': shape [{rows}, {cols + 1}] of F32 needs {rows * (cols + 1) * 4} "
              f"bytes, data_offsets give {end - begin}")
    for argv in (["inspect", bad], ["merge", env.base, bad, "-o", env.out()],
                 ["scale", bad, "2", "-o", env.out()]):
        assert_one_line_error(run(*argv, inputs=[bad]), tensors, needle)


@pytest.fixture(scope="module")
def nan_adapter(env: Env) -> Path:
    with load(env.adapter) as adapter:
        layers = {path: layer for path, layer in adapter.layers()}
        first = sorted(layers)[0]
        a = np.array(layers[first].A)
        a[0, 0], a[1, 1] = np.nan, np.inf
        layers[first] = dataclasses.replace(layers[first], A=a)
        return Adapter.from_layers(
            adapter.architecture, layers, fingerprint=adapter.fingerprint
        ).save(env.root / "nonfinite")


def test_nonfinite_validate_reports(env: Env, nan_adapter: Path) -> None:
    code, _, err = run("validate", nan_adapter, inputs=[nan_adapter])
    assert code == 1
    assert err.strip() == (f"{nan_adapter / 'adapter.safetensors'}: tensor "
                           "'transformer.h.0.attn.c_attn.lora_A': 2 non-finite value(s) (NaN/Inf)")


def test_nonfinite_merge_refused_unless_allowed(env: Env, nan_adapter: Path) -> None:
    needle = ("tensor 'transformer.h.0.attn.c_attn.lora_A' has 2 non-finite value(s) (NaN/Inf); "
              "refusing to merge (use --allow-nonfinite to merge anyway)")
    inputs = [nan_adapter, env.base]
    for argv in (["merge", env.base, nan_adapter, "-o", env.out()],
                 ["merge", env.base, nan_adapter, "-o", env.out(".onnx")],
                 ["unmerge", env.base, nan_adapter, "-o", env.out()]):
        assert_one_line_error(run(*argv, inputs=inputs), nan_adapter, needle)
    out = env.out()
    code, _, err = run("merge", env.base, nan_adapter, "-o", out, "--allow-nonfinite",
                       inputs=inputs)
    assert code == 0, err
    from loraformat.checkpoint import Checkpoint

    with Checkpoint(out) as merged:
        assert not np.isfinite(merged.numpy("transformer.h.0.attn.c_attn.weight")).all()


@pytest.mark.parametrize("argv", [["reduce", "--rank", "2"], ["reduce", "--energy", "0.9"],
                                  ["combine", "--method", "svd"]], ids=" ".join)
def test_nonfinite_refused_by_svd_algebra(env: Env, nan_adapter: Path, argv: list[str]) -> None:
    """An SVD of NaN/Inf fails inside LAPACK: refused up front, naming the layer."""
    extra = [env.adapter] if argv[0] == "combine" else []
    result = run(argv[0], nan_adapter, *extra, *argv[1:], "-o", env.out(),
                 inputs=[nan_adapter, env.adapter])
    assert_one_line_error(result, nan_adapter, "'transformer.h.0.attn.c_attn'", "NaN/Inf")


def test_fingerprint_mismatch_refused_unless_forced(env: Env) -> None:
    inputs = [env.other, env.adapter]
    for out in (env.out(), env.out(".onnx")):
        line = assert_one_line_error(
            run("merge", env.other, env.adapter, "-o", out, inputs=inputs), env.adapter,
            "adapter was made for base fingerprint lfp1:", f"but {env.other} has lfp1:",
            "(a different base; use --force to merge anyway)",
        )
        assert not out.exists()
    with load(env.adapter) as adapter:
        assert adapter.fingerprint[:17] in line  # the adapter's own fingerprint is quoted
    out = env.out()
    code, _, err = run("merge", env.other, env.adapter, "-o", out, "--force", inputs=inputs)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


def test_overwrite_replaces_the_output(env: Env) -> None:
    out = env.out()
    shutil.copytree(env.exists, out)
    code, _, err = run("stack", env.adapter, env.adapter, "-o", out, "--overwrite",
                       inputs=[env.adapter])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".lf-tmp-")]


@pytest.mark.slow
def test_successful_commands_leave_inputs_unchanged(env: Env, tmp_path: Path) -> None:
    """The happy path of every writing command, each hashing its inputs before and after."""
    a, b = env.adapter, env.base
    onnx_out = env.out(".onnx")
    runs = [
        ["merge", b, a, "-o", env.out()],
        ["unmerge", b, a, "-o", env.out()],
        ["convert", a, "-o", env.out(), "--to", "peft", "--base", b],
        ["stack", a, a, "-o", env.out()],
        ["subtract", a, a, "-o", env.out()],
        ["scale", a, "0.5", "-o", env.out()],
        ["reduce", a, "--rank", "2", "-o", env.out()],
        ["combine", a, a, "-o", env.out()],
        ["inspect", a],
        ["validate", a],
        ["export", b, "-o", onnx_out],
        ["merge", onnx_out, a, "-o", env.out(".onnx")],
    ]
    for argv in runs:
        code, _, err = run(*argv, inputs=env.inputs + ([onnx_out] if argv[0] != "export" else []))
        assert code == 0, (argv, err)


def test_outputs_get_the_permissions_open_would_give(env: Env) -> None:
    """Atomic writers create their temporaries 0600 (mkstemp): the output must not keep that."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    a, b = env.adapter, env.base
    outputs = {
        "gguf": (["convert", a, "--base", b, "-o"], env.out(".gguf")),
        "onnx_adapter": (["convert", a, "--base", b, "-o"], env.out(".onnx_adapter")),
        "loralib": (["convert", a, "--base", b, "-o"], env.out(".pt")),
        "single file": (["stack", a, a, "-o"], env.out(".safetensors")),
        "single-file merge": (["merge", b, a, "-o"], env.out(".safetensors")),
    }
    for what, (argv, out) in outputs.items():
        code, _, err = run(*argv, out, inputs=[a, b])
        assert code == 0, (what, err)
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask, (what, oct(out.stat().st_mode))


def test_combine_rank_mismatch_names_a_file(env: Env, tmp_path: Path) -> None:
    """Even an error about several inputs names one of them (the first whose rank differs)."""
    other = random_adapter(env.base, tmp_path / "rank8", rank=8)
    line = assert_one_line_error(
        run("combine", env.adapter, other, "--method", "linear", "-o", env.out(),
            inputs=[env.adapter, other]),
        other, "has ranks [4, 8] in the inputs", "(use --method svd or cat)",
    )
    assert line.startswith(f"error: {other}: ")
