"""The procedural world of the embedded default model.

2,000 concepts (the 1,000 ImageNet-1k classes + 1,000 further ImageNet-21k classes),
each drawn as one shape in a foreground colour on a solid background colour. The
triple (shape, foreground, background) is unique per concept, so a small classifier
can tell all 2,000 concepts apart and every edit can be judged on real images.

Everything here is deterministic: the concept list, the attribute assignment, the
renders (per seed) and the prompt families depend on no global random state.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from ..concepts import OBJECT_PROMPTS, unique_class_names

__all__ = [
    "Concept",
    "SHAPES",
    "PALETTE",
    "EDIT_TEMPLATES",
    "TRAIN_TEMPLATES",
    "FREE_FORM_TEMPLATES",
    "FILLER_SENTENCES",
    "load_concepts",
    "NEUTRAL_NAME",
    "render",
    "render_attributes",
    "render_neutral",
    "free_form_prompts",
    "caption_corpus",
    "training_names",
]

#: Shapes drawn; few and distinct because shape is what a small generator gets wrong.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: 27 colours: every RGB channel in {0, 128, 255}; solid colours render cleanly at 32x32.
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (r, g, b) for r in (0, 128, 255) for g in (0, 128, 255) for b in (0, 128, 255)
)
N_CONCEPTS = 2000
N_IMAGENET1K = 1000
_ASSIGN_SEED = 20240319  # seed of the concept -> attribute assignment
_WEAK_SEED = 7  # seed of the choice of weak aliases
WEAK_ALIAS_FRACTION = 0.08  # of the concepts that have an alias, one alias is made weak

#: The world's generic concept, drawn as an empty canvas: what an erase edits towards
#: (SD's erase destinations are "" or a generic word such as "art").
NEUTRAL_NAME = "empty"
#: Colour of the empty canvas (the palette's mid grey).
NEUTRAL_COLOUR = (128, 128, 128)

#: Three editing templates, as in the EMCID release (objects).
EDIT_TEMPLATES: tuple[str, str, str] = OBJECT_PROMPTS

_PREFIXES = (
    "an image of",
    "a photo of",
    "",
    "a picture of",
    "a drawing of",
    "a painting of",
    "a sketch of",
    "a rendering of",
    "a close-up of",
    "a snapshot of",
    "a photograph of the",
    "an illustration of a",
    "look at this",
    "there is a",
    "here is the",
    "this is a",
    "my favourite",
    "a small",
    "a large",
    "a bright",
)
_SUFFIXES = (
    "",
    " on a table",
    " in the park",
    " in the city",
    " at night",
    " in the morning",
    " on the floor",
    " in a room",
    " near the window",
    " under the sky",
    ", centered",
    ", high quality",
    " in a museum",
    " by the road",
    " resting on a wooden shelf",
    " seen from far away",
    " in a quiet garden",
    " beside a calm lake",
    " on a sunny afternoon",
    " inside an old house",
)
#: (prefix, suffix) combinations held out of training: the free-form prompts. Every word
#: of them is seen in training (in other combinations), as SD has seen every word.
_HELD_OUT_COMBOS = frozenset(
    (p, s)
    for i, p in enumerate(_PREFIXES[3:], start=3)
    for j, s in enumerate(_SUFFIXES[1:], start=1)
    if (i * 7 + j * 3) % 5 == 0
)

#: The training family: every prefix x suffix except the held-out combinations.
TRAIN_TEMPLATES: tuple[str, ...] = tuple(
    (f"{p} {{}}{s}" if p else f"{{}}{s}")
    for p, s in itertools.product(_PREFIXES, _SUFFIXES)
    if (p, s) not in _HELD_OUT_COMBOS
)
#: Pool of free-form templates: the held-out combinations.
FREE_FORM_TEMPLATES: tuple[str, ...] = tuple(sorted(f"{p} {{}}{s}" for p, s in _HELD_OUT_COMBOS))

#: Filler sentences without a concept; part of the caption corpus and of training (as
#: unconditional-like prompts).
FILLER_SENTENCES: tuple[str, ...] = (
    "a quiet morning in the city",
    "an empty room with a window",
    "a photo of something",
    "an image",
    "a picture of an object",
    "a table in the park",
    "the sky at night",
    "a painting in a museum",
    "a drawing on the floor",
    "a road under the sky",
    "a small thing near the window",
    "a large thing on a table",
    "high quality, centered",
    "a close-up photograph",
    "a bright illustration",
    "here is a sketch",
    "this is a rendering",
    "look at this snapshot",
    "my favourite picture",
    "there is nothing here",
)


@dataclass(frozen=True)
class Concept:
    """One concept of the world and its visual signature."""

    index: int
    synset: str
    names: list[str]  # first = class name, rest = aliases
    split: Literal["imagenet1k", "extra"]
    shape: int  # index into SHAPES
    fg: int  # index into PALETTE
    bg: int  # index into PALETTE
    weak_aliases: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The class name (first name)."""
        return self.names[0]

    @property
    def good_names(self) -> list[str]:
        """Names the base model is meant to draw (class name and non-weak aliases)."""
        return [n for n in self.names if n not in self.weak_aliases]


# --- class lists -------------------------------------------------------------------

_MAX_NAMES = 3  # class name + up to two aliases: bounds what the text encoder memorises
_SANE_NAME = re.compile(r"[A-Za-z][A-Za-z '\-]{1,28}[A-Za-z]")


def _read_tsv(name: str) -> list[list[str]]:
    text = (Path(__file__).resolve().parent.parent / "data" / name).read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    return rows[1:]


def _split_names(field_: str) -> list[str]:
    return [n.strip() for n in field_.split(", ") if n.strip()]


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _sane(name: str) -> bool:
    return bool(_SANE_NAME.fullmatch(name)) and len(name.split()) <= 4


def _attribute_triples() -> list[tuple[int, int, int]]:
    """All (shape, fg, bg) triples with enough fg/bg contrast, in a seeded order."""
    triples = []
    for s in range(len(SHAPES)):
        for f, b in itertools.permutations(range(len(PALETTE)), 2):
            steps = sum(x != y for x, y in zip(PALETTE[f], PALETTE[b], strict=True))
            dist = sum(abs(x - y) for x, y in zip(PALETTE[f], PALETTE[b], strict=True))
            if dist >= 250 and steps >= 1:  # at least two palette steps apart
                triples.append((s, f, b))
    random.Random(_ASSIGN_SEED).shuffle(triples)
    return triples


@functools.lru_cache(maxsize=1)
def _build_concepts() -> tuple[Concept, ...]:
    rows1k = _read_tsv("imagenet1k_classes.tsv")
    rows21k = _read_tsv("imagenet21k_lemmas.tsv")
    raw: list[tuple[str, list[str], str]] = []  # synset, names, split
    for idx, synset, names in rows1k:
        ns = unique_class_names(int(idx), _split_names(names))
        raw.append((synset, ns, "imagenet1k"))
    taken_class = {ns[0].lower() for _, ns, _ in raw}
    all_1k_names = {n.lower() for _, ns, _ in raw for n in ns}
    synsets_1k = {s for s, _, _ in raw}
    # Extra concepts: deterministic order by hash of synset, sane names, no collisions.
    candidates = sorted(
        (r for r in rows21k if r[0] not in synsets_1k), key=lambda r: _stable_hash(r[0])
    )
    for synset, names in candidates:
        if len(raw) >= N_CONCEPTS:
            break
        ns = [n for n in _split_names(names) if _sane(n)]
        if not ns or ns[0].lower() in taken_class or ns[0].lower() in all_1k_names:
            continue
        taken_class.add(ns[0].lower())
        raw.append((synset, ns, "extra"))
    assert len(raw) == N_CONCEPTS, len(raw)

    # Aliases: unique across the world (first owner keeps it), never another's class
    # name, capped in number.
    seen: set[str] = set(taken_class)
    cleaned: list[list[str]] = []
    for _, ns, _ in raw:
        keep = [ns[0]]
        for alias in ns[1:]:
            key = alias.lower()
            if len(keep) >= _MAX_NAMES or key in seen or not _sane(alias):
                continue
            seen.add(key)
            keep.append(alias)
        cleaned.append(keep)

    triples = _attribute_triples()[:N_CONCEPTS]
    rng = random.Random(_WEAK_SEED)
    concepts = []
    for i, ((synset, _, split), names, (s, f, b)) in enumerate(
        zip(raw, cleaned, triples, strict=True)
    ):
        weak: list[str] = []
        if len(names) > 1 and rng.random() < WEAK_ALIAS_FRACTION:
            weak = [names[-1]]
        concepts.append(Concept(i, synset, names, split, s, f, b, weak))  # type: ignore[arg-type]
    return tuple(concepts)


def context_words() -> list[str]:
    """Every word of the prompt families (used for random-context augmentation)."""
    text = " ".join(_PREFIXES + _SUFFIXES + FILLER_SENTENCES)
    return sorted({w.strip(",") for w in text.split() if w.strip(",")})


def load_concepts() -> list[Concept]:
    """The 2,000 concepts, index-aligned with the judge's classes."""
    return list(_build_concepts())


def training_names(concept: Concept) -> list[str]:
    """Names used in training with their normal frequency (weak aliases excluded)."""
    return concept.good_names


# --- rendering ---------------------------------------------------------------------

_SUPERSAMPLE = 4


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float):
    """Vertices of a polygonal shape (None for the circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.82, y * 0.82) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x * 1.15, y * 1.15 + 0.15) for x, y in pts]
    elif shape == "cross":
        w = 0.36
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
               (-w, w), (-1, w), (-1, -w), (-w, -w)]  # fmt: skip
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render_attributes(
    shape: int, fg: int, bg: int, rng: np.random.Generator, size: int = 32
) -> Image.Image:
    """Draw one signature with random jitter of position, size and rotation."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[bg])
    draw = ImageDraw.Draw(img)
    r = big * 0.3 * rng.uniform(0.85, 1.15)
    cx = big / 2 + rng.uniform(-0.09, 0.09) * big
    cy = big / 2 + rng.uniform(-0.09, 0.09) * big
    angle = math.radians(rng.uniform(-15, 15))
    poly = _shape_polygon(SHAPES[shape], cx, cy, r, angle)
    if poly is None:
        draw.ellipse([cx - r * 0.95, cy - r * 0.95, cx + r * 0.95, cy + r * 0.95], fill=PALETTE[fg])
    else:
        draw.polygon(poly, fill=PALETTE[fg])
    return img.resize((size, size), Image.Resampling.BOX)


def render_neutral(size: int = 32) -> Image.Image:
    """The neutral drawing: a plain canvas with no shape on it."""
    return Image.new("RGB", (size, size), NEUTRAL_COLOUR)


def _render_rng(concept_index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([concept_index, seed, 0x5EED])


def render(concept_index: int, seed: int, size: int = 32) -> Image.Image:
    """A true image of a concept; the same (concept, seed, size) gives the same pixels."""
    c = _build_concepts()[concept_index]
    return render_attributes(c.shape, c.fg, c.bg, _render_rng(concept_index, seed), size)


# --- prompts -----------------------------------------------------------------------


def free_form_prompts(concept: Concept, n: int = 5) -> list[tuple[str, int]]:
    """Seeded free-form prompts for generalization, disjoint from all training templates.

    The choice of templates and the seeds depend only on the concept index.
    """
    rng = random.Random(concept.index * 1009 + 17)
    templates = rng.sample(FREE_FORM_TEMPLATES, n)
    return [(t.format(concept.name), 10_000 + concept.index * 16 + k) for k, t in enumerate(templates)]


def caption_corpus(n: int | None = None, seed: int = 0) -> list[str]:
    """Captions (training templates x names, plus filler) for preservation statistics.

    With n=None every concept name appears once with a seeded template, plus the fillers.
    """
    rng = random.Random(seed)
    concepts = _build_concepts()
    captions = [rng.choice(TRAIN_TEMPLATES).format(name) for c in concepts for name in c.names]
    captions += list(FILLER_SENTENCES)
    rng.shuffle(captions)
    if n is None:
        return captions
    out = list(captions)
    while len(out) < n:
        c = concepts[rng.randrange(len(concepts))]
        out.append(rng.choice(TRAIN_TEMPLATES).format(rng.choice(c.names)))
    return out[:n]
