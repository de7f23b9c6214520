"""The one exception type the library raises for bad input.

Every failure a user can cause (a missing file, bad JSON, a wrong shape, a refused merge) is a
:class:`LoraformatError` whose ``str()`` is one line naming the file and the problem. The CLI turns
it into that line and exit status 1; anything else escaping is a bug.
"""

from __future__ import annotations

import os


class LoraformatError(Exception):
    """A user-facing error: ``<path>: <problem>`` on one line."""

    def __init__(self, path: str | os.PathLike[str] | None, message: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(f"{self.path}: {self.message}" if self.path else self.message)


class ValidationError(LoraformatError):
    """Raised by loaders when a file is structurally unusable; ``problems`` lists every finding."""

    def __init__(self, path: str | os.PathLike[str] | None, problems: list[str]) -> None:
        self.problems = list(problems)
        first = self.problems[0] if self.problems else "invalid"
        more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        super().__init__(path, first + more)
