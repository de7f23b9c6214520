"""Layer names as data: one table per architecture, both directions derived from it.

Like gguf-py's ``TensorNameMap`` and mergekit's architecture files, an architecture writes its
naming facts once, as rows: the checkpoint's layer path (the weight's tensor name without
``.weight``) and the name each foreign convention gives the same layer. ``{bid}`` (and any other
``{name}``) is a non-negative integer placeholder, typically the block index. ``SAME`` in a cell
means "the checkpoint path itself"; ``None`` means the layer has no name in that convention.

    NameTable(
        ("checkpoint", "peft", "gguf", "mlx"),
        [
            ("model.layers.{bid}.self_attn.q_proj", SAME, "blk.{bid}.attn_q", SAME),
            ("model.embed_tokens", SAME, "token_embd", SAME),
            ("lm_head", SAME, "output", SAME),
        ],
        optional_prefix="model.",
    )

``optional_prefix``: rows are written for the layout transformers saves a ``*For…`` model in; a
bare body checkpoint (``LlamaModel``) stores the same paths without that prefix, and its modules
in memory lack it too. So a bare path's foreign name drops the prefix where the name carries it
(PEFT's ``layers.0.mlp.fc2`` for ``ViTModel``), a foreign name without the prefix maps back to the
bare path, and :meth:`NameTable.layer_path` returns the path the checkpoint actually has when told
which tensors it holds.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

#: A cell meaning "the same name as the checkpoint path".
SAME = "="
CHECKPOINT = "checkpoint"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class _Template:
    text: str
    pattern: re.Pattern[str]
    fields: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> _Template:
        parts, fields, pos = [], [], 0
        for m in _PLACEHOLDER.finditer(text):
            parts.append(re.escape(text[pos : m.start()]))
            name = m.group(1)
            # A repeated placeholder must match the same number both times.
            parts.append(f"(?P={name})" if name in fields else rf"(?P<{name}>0|[1-9]\d*)")
            if name not in fields:
                fields.append(name)
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        return cls(text, re.compile("".join(parts)), tuple(fields))

    def match(self, name: str) -> dict[str, str] | None:
        m = self.pattern.fullmatch(name)
        return m.groupdict() if m else None

    def fill(self, values: dict[str, str]) -> str:
        return self.text.format(**values)


class NameTable:
    """Checkpoint layer paths ↔ foreign names, from one table of rows."""

    def __init__(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[str | None]],
        optional_prefix: str = "",
    ) -> None:
        columns = tuple(columns)
        if not columns or columns[0] != CHECKPOINT:
            raise ValueError(f"the first column must be {CHECKPOINT!r}, got {columns!r}")
        if len(set(columns)) != len(columns):
            raise ValueError(f"duplicate column in {columns!r}")
        self.columns = columns
        self.optional_prefix = optional_prefix
        self._rows: list[dict[str, _Template]] = []
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"row {row!r} has {len(row)} cells, expected {len(columns)}")
            checkpoint = row[0]
            if not checkpoint or checkpoint == SAME:
                raise ValueError(f"row {row!r} has no checkpoint path")
            compiled = {CHECKPOINT: _Template.compile(checkpoint)}
            for column, cell in zip(columns[1:], row[1:], strict=True):
                if cell is None:
                    continue
                template = _Template.compile(checkpoint if cell == SAME else cell)
                if set(template.fields) != set(compiled[CHECKPOINT].fields):
                    raise ValueError(
                        f"row {row!r}: the {column} name must use the same placeholders as the "
                        "checkpoint path"
                    )
                compiled[column] = template
            self._rows.append(compiled)

    @classmethod
    def empty(cls) -> NameTable:
        return cls((CHECKPOINT,), [])

    @property
    def conventions(self) -> tuple[str, ...]:
        """The foreign conventions this table has a column for (``peft``, ``gguf``, ``mlx``…)."""
        return self.columns[1:]

    def rows(self) -> list[dict[str, str]]:
        """The table as written: one dict per row, column → template (absent: no name)."""
        return [{column: t.text for column, t in row.items()} for row in self._rows]

    def foreign(self, layer_path: str, convention: str) -> str | None:
        """The name ``convention`` gives the layer at ``layer_path``, or ``None``."""
        for path in self._candidates(layer_path):
            for row in self._rows:
                values = row[CHECKPOINT].match(path)
                if values is not None:
                    target = row.get(convention)
                    if target is None:
                        return None
                    name = target.fill(values)
                    if path != layer_path:  # a bare body checkpoint: its modules lack the prefix
                        name = name.removeprefix(self.optional_prefix)
                    return name
        return None

    def layer_path(
        self, foreign: str, convention: str, present: Container[str] | None = None
    ) -> str | None:
        """The checkpoint layer path ``convention`` calls ``foreign``, or ``None``.

        ``present``: the checkpoint's tensor names, when known. A row's path is then returned as
        the checkpoint stores it (without ``optional_prefix`` in a bare body checkpoint).
        """
        prefix = self.optional_prefix
        for name in [foreign, prefix + foreign] if prefix else [foreign]:
            for row in self._rows:
                source = row.get(convention)
                values = source.match(name) if source else None
                if values is None:
                    continue
                path = row[CHECKPOINT].fill(values)
                bare = path.removeprefix(prefix) if prefix else path
                if name != foreign and bare != path:  # a bare module name: a bare body's path
                    return bare
                stored_bare = present is not None and path + ".weight" not in present and (
                    bare + ".weight" in present
                )
                return bare if stored_bare else path
        return None

    def _candidates(self, layer_path: str) -> list[str]:
        prefix = self.optional_prefix
        if prefix and not layer_path.startswith(prefix):
            return [layer_path, prefix + layer_path]
        return [layer_path]

    def problems(self, sample_index: int = 3) -> list[str]:
        """What is wrong with the table: a row that does not round-trip, or two rows that claim
        the same name. The conformance kit runs this for every architecture."""
        found: list[str] = []
        for column in self.columns:
            seen: dict[str, str] = {}
            for row in self._rows:
                if column not in row:
                    continue
                values = {f: str(sample_index) for f in row[CHECKPOINT].fields}
                name = row[column].fill(values)
                path = row[CHECKPOINT].fill(values)
                if name in seen and seen[name] != path:
                    found.append(f"{column} name {name!r} is given to both {seen[name]} and {path}")
                seen[name] = path
                if column == CHECKPOINT:
                    continue
                back = self.layer_path(name, column)
                forth = self.foreign(path, column)
                if back != path or forth != name:
                    found.append(
                        f"{column}: {path} → {forth!r} → {back!r} does not round-trip"
                    )
        return found
