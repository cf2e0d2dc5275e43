"""Caption files for the preservation statistics, in the layouts users have them in.

- ``.json``: COCO's captions file (``{"annotations": [{"caption": ...}, ...]}``), a list of
  captions, or a list of objects with a ``caption`` or ``text`` field;
- ``.jsonl``: one such object (or string) per line;
- ``.csv`` / ``.tsv``: the column named ``caption``, ``captions``, ``text``, ``prompt`` or
  ``sentence`` (the first found);
- anything else: one caption per non-blank line.

A file that would give no statistics, or whose layout is none of these, is an
:class:`~emcid.errors.OptionError` naming the file (and the line or columns).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import OptionError, quote
from .textfiles import read_utf8

COLUMNS = ("caption", "captions", "text", "prompt", "sentence")
FIELDS = ("caption", "text")


def _caption(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for name in FIELDS:
            if isinstance(item.get(name), str):
                return item[name]
    raise OptionError(f"corpus {where}: expected a caption string or an object with a "
                      f"{' or '.join(repr(f) for f in FIELDS)} field, got {quote(item)}")


def _from_json(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"corpus {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        if not isinstance(data.get("annotations"), list):
            raise OptionError(f"corpus {path}: a JSON object needs an 'annotations' list (COCO's "
                              f"captions layout); it has {quote(sorted(data))}")
        data = data["annotations"]
    if not isinstance(data, list):
        raise OptionError(f"corpus {path}: give a JSON list of captions or COCO's captions file")
    return [_caption(item, f"{path} item {i}") for i, item in enumerate(data)]


def _from_jsonl(path: Path, text: str) -> list[str]:
    captions = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                captions.append(_caption(json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as exc:
                raise OptionError(f"corpus {path}:{number}: not valid JSON ({exc.msg})") from None
    return captions


def _from_table(path: Path, text: str, delimiter: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    header = {name.strip().lower(): name for name in reader.fieldnames or ()}
    column = next((header[c] for c in COLUMNS if c in header), None)
    if column is None:
        raise OptionError(f"corpus {path}: no caption column; looked for {', '.join(COLUMNS)}, "
                          f"found {quote(list(reader.fieldnames or []))}")
    return [row[column] or "" for row in reader]


def read_corpus(corpus: str | Path) -> list[str]:
    """The captions of a caption file (the layouts of the module doc), blank ones dropped."""
    path = Path(corpus)
    if not path.is_file():
        raise OptionError(f"corpus {quote(str(corpus))} is not a file (give a caption file)")
    try:
        text = read_utf8(path, OptionError)
    except OptionError as exc:
        raise OptionError(f"corpus {exc}") from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise OptionError(f"corpus {path}:{line}: a NUL character: not a text file of captions")
    suffix = path.suffix.lower()
    if suffix == ".json":
        captions = _from_json(path, text)
    elif suffix == ".jsonl":
        captions = _from_jsonl(path, text)
    elif suffix in (".csv", ".tsv"):
        captions = _from_table(path, text, "\t" if suffix == ".tsv" else ",")
    else:
        captions = text.splitlines()
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise OptionError(f"corpus {path} is {'blank' if text else 'empty'}: it holds no "
                          "captions")
    return captions
