"""Edit requests: what to change into what, in which prompts; checked one by one and as a batch.

A request names a ``source`` concept, the ``destination`` it should become, prompt
templates with ``{}`` for the concept, optional reference images of the source, and a seed.
The subject token of a prompt is the last token of the source text inside it
(:func:`emcid.core.tokens.subject_positions`).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Formatter

from ..concepts import OBJECT_PROMPTS
from ..core.generation import MAX_SEED
from ..core.tokens import normalise
from ..errors import RequestError, quote

LIST_SEPARATOR = "|"  # separates several prompts / images inside one CSV cell
ERASE = ""  # the destination that asks for an erase (emcid.tasks.erase)
# Unicode categories with nothing to see: control, format (zero-width), surrogate, separators.
INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})


def text_field(value: object, name: str) -> str:
    """A request field that must be text (YAML turns yes/no/on/off and numbers into others)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise RequestError(f"{name} is the boolean {value} (YAML reads yes/no/on/off/true/false "
                           "as booleans): quote the word")
    if value is None:
        raise RequestError(f"{name} is missing or empty (null)")
    raise RequestError(f"{name} must be text, not the {type(value).__name__} {quote(value)}: quote it")


def _code_points(text: str) -> str:
    """The distinct characters of ``text`` as U+XXXX: readable where they are invisible."""
    return ", ".join(sorted({f"U+{ord(c):04X}" for c in text}))


def visible_text(text: str, name: str) -> str:
    """``text`` without surrounding white space; refused if all that is left is invisible (a
    NUL, a zero-width space): the tokenizer reads no concept there, or junk."""
    text = text.strip()
    if text and all(unicodedata.category(c) in INVISIBLE for c in text):
        raise RequestError(f"{name} {quote(text)} is only invisible or control characters "
                           f"({_code_points(text)}): write the concept in visible text")
    return text


def destination_field(value: object, source: str) -> str:
    """The destination: ``""`` (written so) is an erase; white space alone is refused, since a
    stray space is no way to ask for one."""
    text = text_field(value, "destination")
    if text and not text.strip():
        raise RequestError(f"the destination of {quote(source)} is only white space "
                           f"({len(text)} characters: {_code_points(text)}): "
                           'an erase is written as an empty destination, "" (destination: "" in '
                           "YAML or JSON, an empty CSV cell)")
    return visible_text(text, f"the destination of {quote(source)}")


def seed_field(value: object) -> int:
    """A whole number in torch's seed range; integral strings (CSV cells) are accepted."""
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        seed = value
    elif text and text.lstrip("+-").isdigit():
        seed = int(text)
    else:
        raise RequestError(f"seed must be a whole number, not {quote(value)}")
    if not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed {seed} is outside 0..2**63-1")
    return seed


def list_field(value: object) -> list:
    """A list field: a list as given, a CSV cell split at ``|``, nothing for None."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
    return list(value)


def check_cells(data: dict) -> None:
    """A CSV row with more cells than the header (csv.DictReader files them under the key None)."""
    if None in data:
        raise RequestError(f"more cells than the header has columns: {quote(data[None])}")


def check_template(template: str, source: str) -> None:
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
        f"prompt {quote(template)} of {quote(source)}: {problem}; a prompt holds '{{}}' exactly "
        "once (where the concept goes) and writes a literal brace as '{{' or '}}'"
    )


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
        object.__setattr__(self, "source", visible_text(text_field(self.source, "source"), "source"))
        if not self.source:
            raise RequestError("an edit request has an empty source")
        object.__setattr__(self, "destination", destination_field(self.destination, self.source))
        if isinstance(self.prompts, str) or isinstance(self.reference_images, str):
            raise RequestError(f"prompts and reference_images of {quote(self.source)} are lists")
        object.__setattr__(self, "prompts", tuple(text_field(p, "a prompt") for p in self.prompts))
        object.__setattr__(self, "reference_images", tuple(
            os.fspath(p) if isinstance(p, os.PathLike) else text_field(p, "a reference image")
            for p in self.reference_images))
        object.__setattr__(self, "seed", seed_field(self.seed))
        if normalise(self.source) == normalise(self.destination):
            raise RequestError(f"source and destination are both {quote(self.source)}: nothing to edit")
        if not self.prompts:
            raise RequestError(f"the request for {quote(self.source)} has no prompts")
        for template in self.prompts:
            check_template(template, self.source)

    @property
    def is_erase(self) -> bool:
        """Written as ``destination: ""``: the concept is erased rather than replaced."""
        return self.destination == ERASE

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
        check_cells(data)
        unknown = set(data) - {"source", "destination", "prompts", "reference_images", "seed"}
        if unknown:
            raise RequestError(f"unknown request fields {quote(sorted(unknown, key=str))}")
        for key in ("source", "destination"):
            if data.get(key) is None:
                hint = (' (an erase is an explicit empty destination: destination: "", or an '
                        'empty CSV cell)') if key == "destination" else ""
                raise RequestError(f"{key} is missing or null{hint}")
        kwargs = dict(data)
        for key in ("prompts", "reference_images"):
            value = kwargs.get(key)
            if isinstance(value, str):
                kwargs[key] = list_field(value)
            elif value is not None and not isinstance(value, list):
                raise RequestError(f"{key} must be a list, not {quote(value)}")
            if key in kwargs and not kwargs[key]:
                kwargs.pop(key)
        if base is not None and "reference_images" in kwargs:
            kwargs["reference_images"] = [str(base / text_field(p, "a reference image"))
                                          for p in kwargs["reference_images"]]
        if kwargs.get("seed") in (None, ""):
            kwargs.pop("seed", None)
        return cls(**kwargs)


Labelled = tuple[EditRequest, str]  # a request and the label that names it in errors


def validate_requests(requests: Sequence[EditRequest],
                      labels: Sequence[str] | None = None) -> list[EditRequest]:
    """Check a batch for contradictions; return it with exact duplicates dropped.

    A source appears once (compared case- and space-insensitively): the same source twice
    with another destination, seed, case or prompts is refused, naming both requests
    (``labels``, default "request N"). Chains (a destination that is itself edited, A -> B
    with B -> C) are refused too: EMCID's teacher is the *unedited* model on the
    destination, so A would become the old B, not C. Write A -> C if that is what you mean.
    Cycles (a swap: A -> B with B -> A) are refused, naming the whole cycle.
    """
    if not requests:
        raise RequestError("no edit requests given")
    labels = list(labels) if labels is not None else [f"request {i}" for i in range(1, len(requests) + 1)]
    by_source: dict[str, Labelled] = {}
    unique: list[EditRequest] = []
    for request, label in zip(requests, labels, strict=True):
        key = normalise(request.source)
        if key in by_source:
            previous, where = by_source[key]
            if previous == request:
                continue
            if normalise(previous.destination) != normalise(request.destination):
                raise RequestError(
                    f"{quote(request.source)} is edited twice, to {quote(previous.destination)} "
                    f"({where}) and to {quote(request.destination)} ({label}): keep one"
                )
            raise RequestError(
                f"{where} and {label} both edit {quote(previous.source)} (differing in case, seed, "
                "prompts or reference images): a source appears once; merge them into one request"
            )
        by_source[key] = (request, label)
        unique.append(request)
    _refuse_chains(unique, by_source)
    return unique


def _path(request: EditRequest, by_source: dict[str, Labelled]) -> list[Labelled]:
    """The requests ``request``'s destination leads through (each destination edited by the
    next), up to one whose destination is not edited or is already on the path."""
    path = [by_source[normalise(request.source)]]
    seen = {normalise(request.source)}
    while (key := normalise(path[-1][0].destination)) in by_source and key not in seen:
        seen.add(key)
        path.append(by_source[key])
    return path


def _refuse_chains(unique: list[EditRequest], by_source: dict[str, Labelled]) -> None:
    """Cycles first (a swap is one), naming every concept on them, then chains."""
    paths = [_path(r, by_source) for r in unique]
    for path in paths:
        first, last = path[0][0], path[-1][0]
        if len(path) > 1 and normalise(last.destination) == normalise(first.source):
            concepts = " -> ".join(quote(r.source) for r, _ in path)
            raise RequestError(
                f"cycle {concepts} -> {quote(first.source)} ({'; '.join(w for _, w in path)}): each "
                "destination is itself edited, and EMCID's teacher is the unedited model, so these "
                "are refused like chains; edit each concept to one that is not itself a source")
    for path in paths:
        if len(path) > 1:
            first, last = path[0][0], path[-1][0]
            concepts = " -> ".join(quote(r.source) for r, _ in path)
            raise RequestError(
                f"chain: {concepts} -> {quote(last.destination)} ({'; '.join(w for _, w in path)}): "
                f"{quote(first.source)} would become the unedited {quote(first.destination)}, not "
                f"{quote(last.destination)}. Chains are refused; write {quote(first.source)} -> "
                f"{quote(last.destination)} if you mean it")
