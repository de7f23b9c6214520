"""Atomic outputs: write a temporary sibling, fsync, rename. Never a half-written file.

A reader that sees the final name sees a complete file or directory, whether the writer finished,
raised, or was killed with SIGKILL. Leftover temporaries carry the ``.lf-tmp-`` marker and are never
mistaken for outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import LoraformatError

TMP_MARKER = ".lf-tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool) -> int:
    # mkstemp/mkdtemp create 0600/0700; an output should get the permissions a plain open() or
    # mkdir() would give it, so shared model folders stay readable.
    return (0o777 if is_dir else 0o666) & ~_umask()


def _lowest_existing(out: Path) -> Path:
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` is set, or to write under a
    file. Missing folders above it are fine: the writer makes them (:func:`parent_folders`)."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise LoraformatError(out, "output already exists (use [[overwrite]] to replace it)")
    folder = _lowest_existing(out)
    if not folder.is_dir():
        raise LoraformatError(out, f"{folder} is a file, not a folder to write into")
    return out


def make_parents(path: str | os.PathLike[str]) -> list[Path]:
    """Make the missing folders above ``path``; the ones made, deepest first."""
    out = Path(path)
    made: list[Path] = []
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    for folder in reversed(made):
        try:
            folder.mkdir(mode=0o777)
        except FileExistsError:  # made meanwhile by another writer
            made.remove(folder)
        except NotADirectoryError:
            raise LoraformatError(out, f"{folder.parent} is a file, not a folder") from None
    return made


def remove_made(folders: list[Path]) -> None:
    """Remove folders :func:`make_parents` made (deepest first), where still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def parent_folders(path: str | os.PathLike[str]) -> Iterator[None]:
    """The missing folders above ``path`` exist inside the block; if it fails they are removed
    again, so a failed write leaves nothing behind."""
    made = make_parents(path)
    try:
        yield
    except BaseException:
        remove_made(made)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``path`` for binary writing; rename it into place on success."""
    target = Path(path)
    with parent_folders(target):
        fd, tmp = tempfile.mkstemp(prefix=TMP_MARKER, suffix="-" + target.name, dir=target.parent)
        yield from _fill_file(fd, tmp, target)


def _fill_file(fd: int, tmp: str, target: Path) -> Iterator[BinaryIO]:
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), default_mode(False))
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    Files written inside need no fsync of their own: every file is fsynced here before the rename.
    Replacing an existing directory is two renames (old aside, new in); the old one is removed
    only after the new one is in place.
    """
    target = Path(path)
    with parent_folders(target):
        tmp = Path(tempfile.mkdtemp(prefix=TMP_MARKER, suffix="-" + target.name,
                                    dir=target.parent))
        yield from _fill_dir(tmp, target)


def _fill_dir(tmp: Path, target: Path) -> Iterator[Path]:
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, default_mode(True))
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f"{TMP_MARKER}old-{os.getpid()}-{target.name}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)
