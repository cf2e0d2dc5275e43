"""Text files as emcid reads them (request files, ``--config``, ``--corpus``): UTF-8 with the
line of a bad byte named, and YAML or JSON where a key given twice is an error, since PyYAML
and json keep the last value without a word."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from yaml.constructor import ConstructorError

from ..errors import EmcidError, quote

MERGE_TAG = "tag:yaml.org,2002:merge"


def read_utf8(path: Path, error: type[EmcidError]) -> str:
    """The file as UTF-8 (a byte-order mark is allowed); other encodings name the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                    "save the file as UTF-8") from None


class DuplicateKeyError(ConstructorError):
    """A mapping gives one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (a merge, ``<<``,
    may still be overridden: that is what it is for)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if seen is not key_node:
                    raise DuplicateKeyError(
                        None, None, f"duplicate key {quote(key)} (first on line "
                        f"{seen.start_mark.line + 1}): give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    data: dict = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {quote(key)}: give each key once")
        data[key] = value
    return data


def load_data(path: Path, text: str, error: type[EmcidError]) -> object:
    """The data of a JSON (by suffix) or YAML file; a malformed file or a key given twice is
    ``error``, naming the file and the line (json names no line for a duplicate key)."""
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        except ValueError as exc:  # a duplicate key
            raise error(f"{path}: {exc}") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: builds no objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        kind = "" if isinstance(exc, DuplicateKeyError) else "malformed YAML: "
        raise error(f"{where}: {kind}{problem}") from None
