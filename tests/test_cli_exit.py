"""The ``loraformat`` executable (``loraformat.cli:run``) ends without interpreter teardown, and
loses nothing by it: output flushed, exit status kept, exit handlers run, threads waited for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraformat.cli import _exit_status

ROOT = Path(__file__).resolve().parent.parent


def executable(*args: str, prelude: str = "", cwd: Path | None = None):
    """``loraformat ARGS`` as the console script runs it, with ``prelude`` run first, stdout
    block-buffered (a pipe, no PYTHONUNBUFFERED) so an unflushed write would be lost."""
    code = f"{prelude}\nfrom loraformat.cli import run\nrun()"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def adapter() -> Path:
    return ROOT / "spec" / "vectors" / "basic"


def test_console_script_is_run():
    # the entry point installed (pyproject.toml's [project.scripts])
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "loraformat"]
    assert script.value == "loraformat.cli:run"


def test_output_is_complete_and_status_zero(adapter: Path):
    result = executable("inspect", str(adapter), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole document arrived
    expected = json.loads((adapter / "adapter.json").read_text())["layers"]
    assert sorted(row["path"] for row in report["layers"]) == sorted(expected)


def test_error_keeps_status_and_one_line(tmp_path: Path):
    missing = tmp_path / "nothing-here"
    result = executable("inspect", str(missing))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_usage_error_is_two():
    result = executable("inspect", "--no-such-option")
    assert result.returncode == 2
    assert "No such option" in result.stderr


def test_exit_handlers_run(tmp_path: Path):
    marker = tmp_path / "handler-ran"
    prelude = (f"import atexit, pathlib\n"
               f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')")
    result = executable("--version", prelude=prelude)
    assert result.returncode == 0, result.stderr
    assert "loraformat" in result.stdout
    assert marker.read_text() == "yes"


def test_waits_for_running_thread(tmp_path: Path):
    marker = tmp_path / "thread-done"
    prelude = (f"import threading, time, pathlib\n"
               f"def later():\n"
               f"    time.sleep(0.5)\n"
               f"    pathlib.Path({str(marker)!r}).write_text('done')\n"
               f"threading.Thread(target=later).start()")
    result = executable("--version", prelude=prelude)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "done"


def test_exit_status_of_system_exit_codes(capsys):
    assert _exit_status(None) == 0
    assert _exit_status(3) == 3
    assert _exit_status("bad thing") == 1
    assert capsys.readouterr().err == "bad thing\n"
