"""Benchmark data files in CSV: the header and each record with the line it starts on, or
one line naming the file and line of what is wrong."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import BenchmarkError


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header (stripped, lower case) and each non-blank record as ``(line, {column: cell})``,
    cells stripped; a record may span lines (a quoted cell), and counts from its first."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [cell.strip().lower() for cell in next(reader, [])]
            if not any(header):
                raise BenchmarkError(f"{path}: the file is empty (a header line of columns is needed)")
            repeated = sorted({name for name in header if name and header.count(name) > 1})
            if repeated:
                raise BenchmarkError(f"{path}: the header has the column {repeated[0]!r} twice")
            records, start = [], reader.line_num + 1
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(header):
                    raise BenchmarkError(f"{path} line {line}: {len(cells)} cells, but the header has "
                                         f"{len(header)} columns")
                records.append((line, dict(zip(header, (c.strip() for c in cells), strict=True))))
    except csv.Error as exc:
        raise BenchmarkError(f"{path} line {reader.line_num}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return header, records
