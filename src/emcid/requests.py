"""Edit requests: what to change into what, in which prompts; loading and validation.

A request names a ``source`` concept, the ``destination`` it should become, prompt
templates with ``{}`` for the concept, optional reference images of the source, and a seed.
The subject token of a prompt is the last token of the source text inside it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from .errors import RequestError

OBJECT_PROMPTS = ("An image of {}", "A photo of {}", "{}")  # release default for objects
ARTIST_PROMPTS = ("painting by {}", "artwork by {}", "style of {}")  # release, artists
LIST_SEPARATOR = "|"  # separates several prompts / images inside one CSV cell


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class EditRequest:
    """One concept edit: ``source`` -> ``destination`` in the given prompt templates.

    An empty destination erases the source to a generic concept (see :mod:`emcid.tasks`).
    """

    source: str
    destination: str
    prompts: tuple[str, ...] = OBJECT_PROMPTS
    reference_images: tuple[str, ...] = field(default=())
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(self.source).strip())
        object.__setattr__(self, "destination", str(self.destination).strip())
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "reference_images", tuple(str(p) for p in self.reference_images))
        if not self.source:
            raise RequestError("an edit request has an empty source")
        if _normalise(self.source) == _normalise(self.destination):
            raise RequestError(f"source and destination are both {self.source!r}: nothing to edit")
        if not self.prompts:
            raise RequestError(f"the request for {self.source!r} has no prompts")
        for template in self.prompts:
            if template.count("{}") != 1:
                raise RequestError(
                    f"prompt {template!r} of {self.source!r} must contain '{{}}' exactly once "
                    "(where the concept goes)"
                )

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
        unknown = set(data) - {"source", "destination", "prompts", "reference_images", "seed"}
        if unknown:
            raise RequestError(f"unknown request fields {sorted(unknown)} in {data}")
        if "source" not in data or "destination" not in data:
            raise RequestError(f"a request needs 'source' and 'destination': {data}")
        kwargs = dict(data)
        for key in ("prompts", "reference_images"):
            value = kwargs.get(key)
            if isinstance(value, str):
                kwargs[key] = [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
            if key in kwargs and not kwargs[key]:
                kwargs.pop(key)
        if base is not None and "reference_images" in kwargs:
            kwargs["reference_images"] = [str(base / p) for p in kwargs["reference_images"]]
        if kwargs.get("seed") in (None, ""):
            kwargs.pop("seed", None)
        else:
            kwargs["seed"] = int(kwargs["seed"])
        return cls(**kwargs)


def validate_requests(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """Check a batch for contradictions; return it with exact duplicates dropped.

    Refused: the same source twice with different destinations, and chains (a destination
    that is itself edited, A -> B with B -> C). A chain is ambiguous: EMCID's teacher is the
    *unedited* model on the destination, so A would become the old B, not C. Write A -> C
    explicitly if that is what you mean.
    """
    if not requests:
        raise RequestError("no edit requests given")
    by_source: dict[str, EditRequest] = {}
    unique: list[EditRequest] = []
    for request in requests:
        key = _normalise(request.source)
        if key in by_source:
            previous = by_source[key]
            if _normalise(previous.destination) != _normalise(request.destination):
                raise RequestError(
                    f"{request.source!r} is edited twice, to {previous.destination!r} and to "
                    f"{request.destination!r}: keep one"
                )
            if previous == request:
                continue
        by_source[key] = request
        unique.append(request)
    for request in unique:
        chained = by_source.get(_normalise(request.destination))
        if chained is not None:
            raise RequestError(
                f"chain: {request.source!r} -> {request.destination!r}, but "
                f"{chained.source!r} is itself edited to {chained.destination!r}. Chains are "
                f"refused; write {request.source!r} -> {chained.destination!r} if you mean it"
            )
    return unique


def load_requests(path: str | os.PathLike) -> list[EditRequest]:
    """Read requests from YAML, JSON (a list, or ``{"requests": [...]}``) or CSV.

    CSV columns: source, destination, and optionally prompts and reference_images (several
    values separated by ``|``) and seed. Relative image paths are taken from the file's folder.
    """
    path = Path(path)
    if not path.exists():
        raise RequestError(f"request file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        rows = yaml.safe_load(path.read_text())
    elif suffix == ".json":
        rows = json.loads(path.read_text())
    elif suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise RequestError(f"{path}: request files are .yaml, .yml, .json or .csv")
    if isinstance(rows, dict):
        rows = rows.get("requests")
    if not isinstance(rows, list):
        raise RequestError(f"{path}: expected a list of requests")
    requests = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise RequestError(f"{path}: request {number} is not a mapping: {row!r}")
        try:
            requests.append(EditRequest.from_dict(row, base=path.parent))
        except (RequestError, TypeError, ValueError) as exc:
            raise RequestError(f"{path}: request {number}: {exc}") from exc
    return validate_requests(requests)


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
        start = template.index("{}")
        end = start + len(subject)
        encoded = tokenizer(
            prompt, truncation=False, return_offsets_mapping=True, add_special_tokens=True
        )
        inside = [
            i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start
        ]
        if not inside:
            raise RequestError(f"subject {subject!r} not found among the tokens of {prompt!r}")
        last = inside[-1]
        if last >= tokenizer.model_max_length - 1:
            raise RequestError(
                f"subject {subject!r} ends at token {last} of {prompt!r}, beyond the "
                f"{tokenizer.model_max_length}-token window: shorten the prompt"
            )
        positions.append(last)
    return torch.tensor(positions, dtype=torch.long)
