"""Request files and lists: one loader and one parser for both kinds of request.

The same files and lists carry edit requests and debias requests (``{source: doctor,
debias: [male, female]}``); one file or list holds one kind.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from ..core.textfiles import load_data, read_utf8
from ..errors import RequestError, quote
from .debias import DebiasRequest, validate_debias_requests
from .edit import EditRequest, validate_requests
from .images import check_image


def _item_lines(text: str) -> list[int] | None:
    """Line of each request in a YAML (or JSON) list, for error messages; None if unknown."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if k.value == "requests"), None)
    if not isinstance(node, yaml.SequenceNode):
        return None
    return [item.start_mark.line + 1 for item in node.value]


def _read_rows(path: Path) -> tuple[list, list[str]]:
    """The rows of a request file and a label naming each (file, line and request number)."""
    text = read_utf8(path, RequestError)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = set(reader.fieldnames or ())
        if {"debias", "destination"} <= header:
            raise RequestError(f"{path}:1: the header has both a destination (edit) and a debias "
                               "column: put edit and debias requests in separate files")
        missing = {"source", "debias" if "debias" in header else "destination"} - header
        if missing:
            raise RequestError(f"{path}:1: the header lacks the column(s) {sorted(missing)}")
        rows, labels = [], []
        try:
            for number, row in enumerate(reader, 1):
                rows.append(row)
                labels.append(f"{path}:{reader.line_num}: request {number}")
        except csv.Error as exc:
            raise RequestError(f"{path}:{reader.line_num}: malformed CSV: {quote(str(exc))}") from None
        return rows, labels
    rows = load_data(path, text, RequestError)
    if isinstance(rows, dict):
        rows = rows.get("requests")
    if not isinstance(rows, list):
        raise RequestError(f"{path}: expected a list of requests (or {{requests: [...]}})")
    lines = _item_lines(text) or []
    labels = [f"{path}:{lines[i]}: request {i + 1}" if i < len(lines) else f"{path}: request {i + 1}"
              for i in range(len(rows))]
    return rows, labels


def load_requests(path: str | os.PathLike) -> list[EditRequest] | list[DebiasRequest]:
    """Read requests from YAML, JSON (a list, or ``{"requests": [...]}``) or CSV.

    CSV columns: source, destination, and optionally prompts and reference_images (several
    values separated by ``|``) and seed; an empty destination cell is an erase, a row with
    fewer cells than the header an error. A file of debias requests (a ``debias`` field or
    column instead of ``destination``) gives :class:`~emcid.requests.DebiasRequest` objects.
    Relative image paths are taken from the file's folder. Every error names the file, the
    line and the request.
    """
    path, rows, labels = _load_rows(path)
    return parse_requests(rows, labels, base=path.parent)


def load_debias_requests(path: str | os.PathLike) -> list[DebiasRequest]:
    """:func:`load_requests` for a file that must hold debias requests."""
    path, rows, labels = _load_rows(path)
    return parse_requests(rows, labels, base=path.parent, debias=True)


def _load_rows(path: str | os.PathLike) -> tuple[Path, list, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"request file {path} does not exist" if not path.exists()
                           else f"{path} is not a file")
    if path.suffix.lower() not in (".yaml", ".yml", ".json", ".csv"):
        raise RequestError(f"{path}: request files are .yaml, .yml, .json or .csv")
    return path, *_read_rows(path)


def _is_debias(item: object) -> bool:
    return isinstance(item, DebiasRequest) or (isinstance(item, dict) and "debias" in item)


def is_debias_batch(requests: Sequence) -> bool:
    """Whether ``requests`` (parsed by :func:`parse_requests`) are debias requests."""
    return bool(requests) and _is_debias(requests[0])


def parse_requests(items: Sequence, labels: Sequence[str] | None = None, base: Path | None = None,
                   debias: bool | None = None) -> list[EditRequest] | list[DebiasRequest]:
    """Requests from mappings (a request file's rows) or request objects, checked as a batch.

    Rows with a ``debias`` field are debias requests, the others edits; a batch mixing the
    two is refused (they are two tasks, each with its own patch). ``labels`` name the items
    in errors (default "request N"); ``base`` is the folder relative image paths start from.
    ``debias`` fixes the kind instead (every row is then read as that kind). Reference images
    are checked here (they exist and PIL reads them), since Stage I reads them only late.
    """
    items = list(items)
    labels = list(labels) if labels is not None else [f"request {i}" for i in range(1, len(items) + 1)]
    kinds = [_is_debias(item) if debias is None else debias for item in items]
    if any(kinds) and not all(kinds):
        raise RequestError(
            f"{labels[kinds.index(True)]} is a debias request but {labels[kinds.index(False)]} is "
            "an edit: a request file (or list) holds one kind; split them into two and run each")
    debiasing = any(kinds) if debias is None else debias
    requests = []
    for item, label in zip(items, labels, strict=True):
        try:
            request = _parse_one(item, debiasing, base)
            for path in getattr(request, "reference_images", ()):  # read only in Stage I
                check_image(path, request.source)
        except RequestError as exc:
            raise RequestError(f"{label}: {exc}") from None
        requests.append(request)
    if not debiasing:
        return validate_requests(requests, labels)
    return validate_debias_requests(requests)


def _parse_one(item: object, debiasing: bool, base: Path | None) -> EditRequest | DebiasRequest:
    if isinstance(item, (EditRequest, DebiasRequest)):
        return item
    if not isinstance(item, dict):
        raise RequestError(f"not a mapping of fields: {quote(item)}")
    if not debiasing:
        return EditRequest.from_dict(item, base=base)
    try:
        return DebiasRequest.from_dict(item)
    except (TypeError, ValueError) as exc:  # e.g. a seed that is not a number
        raise RequestError(str(exc)) from None


def save_requests(requests: Iterable[EditRequest], path: str | os.PathLike) -> None:
    """Write requests as YAML or JSON, by suffix."""
    path = Path(path)
    rows = [r.to_dict() for r in requests]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        path.write_text(yaml.safe_dump(rows, sort_keys=False))
