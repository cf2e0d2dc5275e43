"""Lists of names with their prompts: the artist files of ``emcid bench artists`` and the
profession files of ``emcid bench professions``.

Two layouts, told apart by the suffix. A ``.csv`` file has a header with the name's column
(``artist``, ``profession``) and optionally ``prompt``; other columns are ignored, so the
public UCE/ESD artist files (``prompt,evaluation_seed,case_number,artist``, several rows per
artist) load as they are, their rows grouped by name. Any other file is plain text, one name
a line (blank lines and lines starting with ``#`` skipped); a name without prompts is drawn
from its benchmark's template. A bad file is refused in one line naming the file, and the
line or the column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BenchmarkError
from .csvfile import read_rows


@dataclass(frozen=True)
class NamedPrompts:
    """A name, the file's prompts for it (none: its benchmark's template), and the line it
    first appears on."""

    name: str
    prompts: tuple[str, ...]
    line: int


def _add(found: dict[str, NamedPrompts], name: str, prompt: str, line: int) -> None:
    """Group by name (case-insensitive, first spelling kept); each prompt once."""
    entry = found.setdefault(name.casefold(), NamedPrompts(name, (), line))
    if prompt and prompt not in entry.prompts:
        found[name.casefold()] = NamedPrompts(entry.name, (*entry.prompts, prompt), entry.line)


def _from_csv(path: Path, column: str) -> dict[str, NamedPrompts]:
    header, rows = read_rows(path)
    if column not in header:
        raise BenchmarkError(f"{path}: no column {column!r} (a CSV {column} file has the columns "
                             f"{column} and, optionally, prompt; or give a plain text file, one "
                             f"{column} a line)")
    found: dict[str, NamedPrompts] = {}
    for line, cells in rows:
        for name in (column, "prompt"):
            if name in cells and not cells[name]:
                raise BenchmarkError(f"{path} line {line}: the cell of column {name!r} is empty")
        _add(found, cells[column], cells.get("prompt") or "", line)
    return found


def _from_text(path: Path) -> dict[str, NamedPrompts]:
    found: dict[str, NamedPrompts] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            name = text.strip()
            if name and not name.startswith("#"):
                _add(found, name, "", line)
    return found


def load_names(path: str | Path, column: str) -> list[NamedPrompts]:
    """The names of a CSV file's ``column`` (with their ``prompt`` cells, where the column is
    there) or of a plain text file (one a line), in file order."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such {column} file")
    found = _from_csv(path, column) if path.suffix.lower() == ".csv" else _from_text(path)
    if not found:
        raise BenchmarkError(f"{path}: the file names no {column}")
    return list(found.values())
