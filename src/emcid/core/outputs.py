"""Where a command may write: never over what the user gave it to read.

Every command that writes checks its ``--out`` here before any work starts (before the model
loads), so a mistyped path costs nothing and destroys nothing: an output that resolves
(symlinks followed) to an input file, lies inside an input folder, or (for outputs that
replace a whole folder) contains an input, is refused in one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from ..errors import OutputPathError

Kind = Literal["file", "folder", "replaced folder"]


def _inputs(inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> list[tuple[str, str, Path]]:
    """Existing local inputs (hub ids and absent options are not files), resolved."""
    found = []
    for role, given in inputs:
        if given is not None and Path(given).exists():
            found.append((role, str(given), Path(given).resolve()))
    return found


def check_output(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                 kind: Kind, suffix: str | None = None) -> Path:
    """Refuse ``out`` if writing it could destroy an input, or cannot succeed; returns it.

    ``inputs``: (role, path) pairs, e.g. ``("model", "sd15/")``; None paths are skipped.
    ``kind``: a ``file``; a ``folder`` that receives files; or a ``replaced folder`` (a
    pipeline folder written whole and swapped in), which also must not contain an input.
    ``suffix``: the one file suffix a file output may have (e.g. ``.safetensors``).
    """
    out = Path(out)
    target = out.resolve()
    for role, given, source in _inputs(inputs):
        inside = source.is_dir() and source in target.parents
        holds = kind == "replaced folder" and target in source.parents
        if target == source or inside or holds:
            where = "" if target == source else (" (it lies inside that folder)" if inside
                                                 else " (it would replace a folder holding it)")
            raise OutputPathError(f"--out {out} would overwrite the {role} {given}{where}: emcid never "
                                  "writes over its inputs; choose a new path")
    if kind == "file":
        if out.is_dir():
            raise OutputPathError(f"--out {out} is a folder; give a file name"
                                  + (f" ending in {suffix}" if suffix else ""))
        if suffix and out.suffix != suffix:
            raise OutputPathError(f"--out {out}: give a file name ending in {suffix}")
    elif out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file; give a folder")
    _check_writable(out, target)
    return out


def _check_writable(out: Path, target: Path) -> None:
    """The nearest existing folder at or above ``out`` must be writable (checked up front, so a
    read-only place fails before the work, not after it)."""
    existing = target if target.is_dir() else target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"--out {out}: {existing} is a file, so nothing can be written under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"--out {out}: {existing} is not writable")
