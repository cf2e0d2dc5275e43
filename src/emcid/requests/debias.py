"""Debias requests: a concept to balance over attribute values (the task: :mod:`emcid.tasks.debias`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..concepts import OBJECT_PROMPTS
from ..core.tokens import normalise
from ..errors import RequestError, quote
from .edit import EditRequest, check_cells, list_field, seed_field, text_field, visible_text

ARTICLES = ("a", "an", "the")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _value_text(value: object) -> str:
    """An attribute value as text: numbers (an age) are taken as written, containers refused."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return text_field(value, "a debias value")


@dataclass(frozen=True)
class DebiasRequest:
    """Balance ``source`` (a concept such as "doctor") over attribute ``values``."""

    source: str
    values: tuple[str, ...]
    prompts: tuple[str, ...] = OBJECT_PROMPTS
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", visible_text(text_field(self.source, "source"), "source"))
        object.__setattr__(self, "values", tuple(visible_text(_value_text(v), "a debias value")
                                                 for v in self.values))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.noun:
            raise RequestError(f"a debias request has an empty source: {quote(self.to_dict())}")
        normalised = [normalise(v) for v in self.values]
        if len(self.values) < 2 or "" in normalised:
            raise RequestError(
                f"the debias request for {quote(self.source)} needs at least two attribute values "
                f"(e.g. debias: [male, female]); it has {quote(list(self.values))}"
            )
        if len(set(normalised)) < len(normalised):
            raise RequestError(f"the debias request for {quote(self.source)} repeats a value: "
                               f"{quote(list(self.values))}")
        self.stage1_requests()  # checks the prompt templates as for any edit

    @property
    def noun(self) -> str:
        """The concept without a leading article ("a doctor" -> "doctor")."""
        first, _, rest = self.source.partition(" ")
        return rest.strip() if first.lower() in ARTICLES and rest.strip() else self.source

    def concept(self) -> str:
        """The source phrase: "a doctor", "an engineer"."""
        return f"{_article(self.noun)} {self.noun}"

    def destinations(self) -> list[str]:
        """One phrase per value: "a male doctor", "a female doctor" (also the classifier's labels)."""
        return [f"{_article(v)} {v} {self.noun}" for v in self.values]

    def stage1_requests(self) -> list[EditRequest]:
        return [EditRequest(self.concept(), d, self.prompts, seed=self.seed) for d in self.destinations()]

    def to_dict(self) -> dict:
        return {"source": self.source, "debias": list(self.values), "prompts": list(self.prompts),
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict) -> DebiasRequest:
        check_cells(data)
        unknown = set(data) - {"source", "debias", "prompts", "seed"}
        if unknown:
            raise RequestError(f"unknown debias request fields {quote(sorted(unknown, key=str))} "
                               f"in {quote(data)}")
        if "source" not in data or "debias" not in data:
            raise RequestError(f"a debias request needs 'source' and 'debias' (the values): {quote(data)}")
        kwargs: dict = {"source": data["source"], "values": list_field(data["debias"])}
        if list_field(data.get("prompts")):
            kwargs["prompts"] = list_field(data["prompts"])
        if data.get("seed") not in (None, ""):
            kwargs["seed"] = seed_field(data["seed"])
        return cls(**kwargs)


def validate_debias_requests(requests: Sequence[DebiasRequest]) -> list[DebiasRequest]:
    """Refuse an empty batch and a concept debiased twice."""
    if not requests:
        raise RequestError("no debias requests given")
    seen: dict[str, DebiasRequest] = {}
    for request in requests:
        key = normalise(request.noun)
        if key in seen:
            raise RequestError(f"{quote(request.source)} is debiased twice ({quote(list(seen[key].values))} "
                               f"and {quote(list(request.values))}): keep one")
        seen[key] = request
    return list(requests)
