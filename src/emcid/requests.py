"""Edit requests: what to change into what, in which prompts; loading and validation.

A request names a ``source`` concept, the ``destination`` it should become, prompt
templates with ``{}`` for the concept, optional reference images of the source, and a seed.
The subject token of a prompt is the last token of the source text inside it.

The same files and lists also carry debias requests (``{source: doctor, debias: [male,
female]}``, :mod:`emcid.debias`); one file or list holds one kind of request.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING

import torch
import yaml

from .errors import RequestError

if TYPE_CHECKING:
    from .debias import DebiasRequest

OBJECT_PROMPTS = ("An image of {}", "A photo of {}", "{}")  # release default for objects
ARTIST_PROMPTS = ("painting by {}", "artwork by {}", "style of {}")  # release, artists
LIST_SEPARATOR = "|"  # separates several prompts / images inside one CSV cell


PROMPT_QUOTE = 60  # characters of a prompt quoted in an error message
MAX_SEED = 2**63  # torch generators take seeds below this


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _quote_start(text: str) -> str:
    """The start of a long text, for error messages that must stay one readable line."""
    return repr(text if len(text) <= PROMPT_QUOTE else text[:PROMPT_QUOTE] + "...")


def _text(value: object, name: str) -> str:
    """A request field that must be text (YAML turns yes/no/on/off and numbers into others)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise RequestError(f"{name} is the boolean {value} (YAML reads yes/no/on/off/true/false "
                           "as booleans): quote the word")
    if value is None:
        raise RequestError(f"{name} is missing or empty (null)")
    raise RequestError(f"{name} must be text, not the {type(value).__name__} {value!r}: quote it")


def _seed(value: object) -> int:
    """A whole number in torch's seed range; integral strings (CSV cells) are accepted."""
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        seed = value
    elif text and text.lstrip("+-").isdigit():
        seed = int(text)
    else:
        raise RequestError(f"seed must be a whole number, not {value!r}")
    if not 0 <= seed < MAX_SEED:
        raise RequestError(f"seed {seed} is outside 0..2**63-1")
    return seed


def _check_template(template: str, source: str) -> None:
    """Exactly one ``{}`` and no other replacement field (literal braces are ``{{``/``}}``)."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        fields, problem = None, str(exc)
    if fields == [("", "", None)]:
        return
    if fields is not None:
        problem = "no '{}'" if not fields else "braces other than one '{}'"
    raise RequestError(
        f"prompt {_quote_start(template)} of {source!r}: {problem}; a prompt holds '{{}}' exactly "
        "once (where the concept goes) and writes a literal brace as '{{' or '}}'"
    )


def _subject_start(template: str) -> int:
    """Character offset of the concept in the formatted prompt (literal braces unescaped)."""
    offset = 0
    for literal, name, _, _ in Formatter().parse(template):
        offset += len(literal)
        if name is not None:
            return offset
    raise RequestError(f"prompt {_quote_start(template)} has no '{{}}'")


@dataclass(frozen=True)
class EditRequest:
    """One concept edit: ``source`` -> ``destination`` in the given prompt templates.

    An empty destination (``destination: ""``) is an *erase* request: the concept goes to a
    generic one (see :mod:`emcid.tasks`). A missing or null destination is an error, never an erase.
    """

    source: str
    destination: str
    prompts: tuple[str, ...] = OBJECT_PROMPTS
    reference_images: tuple[str, ...] = field(default=())
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _text(self.source, "source").strip())
        object.__setattr__(self, "destination", _text(self.destination, "destination").strip())
        if isinstance(self.prompts, str) or isinstance(self.reference_images, str):
            raise RequestError(f"prompts and reference_images of {self.source!r} are lists")
        object.__setattr__(self, "prompts", tuple(_text(p, "a prompt") for p in self.prompts))
        object.__setattr__(self, "reference_images", tuple(
            os.fspath(p) if isinstance(p, os.PathLike) else _text(p, "a reference image")
            for p in self.reference_images))
        object.__setattr__(self, "seed", _seed(self.seed))
        if not self.source:
            raise RequestError("an edit request has an empty source")
        if _normalise(self.source) == _normalise(self.destination):
            raise RequestError(f"source and destination are both {self.source!r}: nothing to edit")
        if not self.prompts:
            raise RequestError(f"the request for {self.source!r} has no prompts")
        for template in self.prompts:
            _check_template(template, self.source)

    @property
    def is_erase(self) -> bool:
        """Written as ``destination: ""``: the concept is erased rather than replaced."""
        return not self.destination

    def source_prompts(self) -> list[str]:
        return [t.format(self.source) for t in self.prompts]

    def destination_prompts(self) -> list[str]:
        return [t.format(self.destination) for t in self.prompts]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["prompts"] = list(self.prompts)
        data["reference_images"] = list(self.reference_images)
        return data

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None) -> EditRequest:
        if None in data:  # csv.DictReader files surplus cells under the key None
            raise RequestError(f"more cells than the header has columns: {data[None]!r}")
        unknown = set(data) - {"source", "destination", "prompts", "reference_images", "seed"}
        if unknown:
            raise RequestError(f"unknown request fields {sorted(unknown)}")
        for key in ("source", "destination"):
            if data.get(key) is None:
                hint = (' (an erase is an explicit empty destination: destination: "", or an '
                        'empty CSV cell)') if key == "destination" else ""
                raise RequestError(f"{key} is missing or null{hint}")
        kwargs = dict(data)
        for key in ("prompts", "reference_images"):
            value = kwargs.get(key)
            if isinstance(value, str):
                kwargs[key] = [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
            elif value is not None and not isinstance(value, list):
                raise RequestError(f"{key} must be a list, not {value!r}")
            if key in kwargs and not kwargs[key]:
                kwargs.pop(key)
        if base is not None and "reference_images" in kwargs:
            kwargs["reference_images"] = [str(base / _text(p, "a reference image"))
                                          for p in kwargs["reference_images"]]
        if kwargs.get("seed") in (None, ""):
            kwargs.pop("seed", None)
        return cls(**kwargs)


def validate_requests(requests: Sequence[EditRequest],
                      labels: Sequence[str] | None = None) -> list[EditRequest]:
    """Check a batch for contradictions; return it with exact duplicates dropped.

    A source appears once (compared case- and space-insensitively): the same source twice
    with another destination, seed, case or prompts is refused, naming both requests
    (``labels``, default "request N"). Chains (a destination that is itself edited, A -> B
    with B -> C) are refused too: EMCID's teacher is the *unedited* model on the
    destination, so A would become the old B, not C. Write A -> C if that is what you mean.
    """
    if not requests:
        raise RequestError("no edit requests given")
    labels = list(labels) if labels is not None else [f"request {i}" for i in range(1, len(requests) + 1)]
    by_source: dict[str, tuple[EditRequest, str]] = {}
    unique: list[EditRequest] = []
    for request, label in zip(requests, labels, strict=True):
        key = _normalise(request.source)
        if key in by_source:
            previous, where = by_source[key]
            if previous == request:
                continue
            if _normalise(previous.destination) != _normalise(request.destination):
                raise RequestError(
                    f"{request.source!r} is edited twice, to {previous.destination!r} ({where}) "
                    f"and to {request.destination!r} ({label}): keep one"
                )
            raise RequestError(
                f"{where} and {label} both edit {previous.source!r} (differing in case, seed, "
                "prompts or reference images): a source appears once; merge them into one request"
            )
        by_source[key] = (request, label)
        unique.append(request)
    for request in unique:
        chained = by_source.get(_normalise(request.destination))
        if chained is not None:
            chained = chained[0]
            raise RequestError(
                f"chain: {request.source!r} -> {request.destination!r}, but "
                f"{chained.source!r} is itself edited to {chained.destination!r}. Chains are "
                f"refused; write {request.source!r} -> {chained.destination!r} if you mean it"
            )
    return unique


def _read_text(path: Path) -> str:
    """The file as UTF-8 (a byte-order mark is allowed); other encodings name the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RequestError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                           "save the file as UTF-8") from None


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


def _parse_mapping_file(path: Path, text: str) -> object:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} "
                               f"(column {exc.colno})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RequestError(f"{where}: malformed YAML: {problem}") from None


def _read_rows(path: Path) -> tuple[list, list[str]]:
    """The rows of a request file and a label naming each (file, line and request number)."""
    text = _read_text(path)
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
            raise RequestError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
        return rows, labels
    rows = _parse_mapping_file(path, text)
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
    column instead of ``destination``) gives :class:`~emcid.debias.DebiasRequest` objects.
    Relative image paths are taken from the file's folder. Every error names the file, the
    line and the request.
    """
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"request file {path} does not exist" if not path.exists()
                           else f"{path} is not a file")
    if path.suffix.lower() not in (".yaml", ".yml", ".json", ".csv"):
        raise RequestError(f"{path}: request files are .yaml, .yml, .json or .csv")
    rows, labels = _read_rows(path)
    return parse_requests(rows, labels, base=path.parent)


def _is_debias(item: object) -> bool:
    from .debias import DebiasRequest

    return isinstance(item, DebiasRequest) or (isinstance(item, dict) and "debias" in item)


def is_debias_batch(requests: Sequence) -> bool:
    """Whether ``requests`` (parsed by :func:`parse_requests`) are debias requests."""
    return bool(requests) and _is_debias(requests[0])


def parse_requests(items: Sequence, labels: Sequence[str] | None = None, base: Path | None = None,
                   ) -> list[EditRequest] | list[DebiasRequest]:
    """Requests from mappings (a request file's rows) or request objects, checked as a batch.

    Rows with a ``debias`` field are debias requests, the others edits; a batch mixing the
    two is refused (they are two tasks, each with its own patch). ``labels`` name the items
    in errors (default "request N"); ``base`` is the folder relative image paths start from.
    """
    items = list(items)
    labels = list(labels) if labels is not None else [f"request {i}" for i in range(1, len(items) + 1)]
    kinds = [_is_debias(item) for item in items]
    if any(kinds) and not all(kinds):
        raise RequestError(
            f"{labels[kinds.index(True)]} is a debias request but {labels[kinds.index(False)]} is "
            "an edit: a request file (or list) holds one kind; split them into two and run each")
    debiasing = any(kinds)
    requests = []
    for item, label in zip(items, labels, strict=True):
        try:
            requests.append(_parse_one(item, debiasing, base))
        except RequestError as exc:
            raise RequestError(f"{label}: {exc}") from None
    if not debiasing:
        return validate_requests(requests, labels)
    from .debias import validate_debias_requests

    return validate_debias_requests(requests)


def _parse_one(item: object, debiasing: bool, base: Path | None) -> EditRequest | DebiasRequest:
    from .debias import DebiasRequest

    if isinstance(item, (EditRequest, DebiasRequest)):
        return item
    if not isinstance(item, dict):
        raise RequestError(f"not a mapping of fields: {_quote_start(repr(item))}")
    if not debiasing:
        return EditRequest.from_dict(item, base=base)
    if None in item:  # csv.DictReader files surplus cells under the key None
        raise RequestError(f"more cells than the header has columns: {item[None]!r}")
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


def subject_positions(tokenizer, templates: Sequence[str], subject: str) -> torch.Tensor:
    """Index of the last token of ``subject`` inside each formatted template.

    Uses the tokenizer's character offsets, so multi-token concepts and punctuation next to
    the concept are handled. Raises if the subject falls outside the token window.
    """
    positions = []
    for template in templates:
        prompt = template.format(subject)
        start = _subject_start(template)
        end = start + len(subject)
        encoded = tokenizer(
            prompt, truncation=False, return_offsets_mapping=True, add_special_tokens=True
        )
        inside = [
            i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start
        ]
        if not inside:
            raise RequestError(
                f"subject {subject!r} not found among the tokens of {_quote_start(prompt)}")
        last = inside[-1]
        if last >= tokenizer.model_max_length - 1:
            raise RequestError(
                f"prompt {_quote_start(prompt)} is {len(encoded['input_ids'])} tokens long and "
                f"its subject {_quote_start(subject)} ends at token {last}, beyond the "
                f"{tokenizer.model_max_length}-token window: shorten the prompt"
            )
        positions.append(last)
    return torch.tensor(positions, dtype=torch.long)
