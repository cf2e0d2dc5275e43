"""The embedded world's analogues of artist styles and of a debiased attribute.

Both act on one attribute the judge reads, the background colour:

- **Styles.** Every concept name is also a style, whose colour is that concept's background
  (the neutral concept's is its grey). The release's artist prompts alone ("painting by X",
  "artwork by X", "style of X") draw a plain canvas in X's colour; "<object prompt> in the
  style of X" draws the object on X's colour. Erasing a style makes its prompts lose that
  colour while other styles and the objects stay, as erasing an artist should on SD.
- **Colour words.** "a teal tench" draws a tench on teal: the attribute a debias request
  balances (``debias: [teal, amber]``), as "a male doctor" / "a female doctor" on SD. The
  words are chosen so that none is a word of any concept name.

An object is only drawn on a colour it stands out from (the world's own contrast rule);
:func:`can_draw_on` says which pairs exist.
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import numpy as np
from PIL import Image

from . import world

__all__ = [
    "STYLE_PROMPTS",
    "STYLED_OBJECT",
    "COLOUR_WORDS",
    "MIN_CONTRAST",
    "style_colour",
    "colour_index",
    "colour_of_phrase",
    "can_draw_on",
    "render_on",
    "render_canvas",
    "TaskExample",
    "with_article",
    "sample_task_examples",
    "sample_task_captions",
    "tasks_caption_corpus",
]

#: The release's artist prompts (docs/method.md): a style alone draws a canvas in its colour.
STYLE_PROMPTS: tuple[str, str, str] = ("painting by {}", "artwork by {}", "style of {}")
#: An object prompt followed by a style: the object on the style's colour.
STYLED_OBJECT = "{} in the style of {}"
#: Colour word -> palette colour. No word is part of a concept name, so "a teal X" never
#: reads as another concept.
COLOUR_WORDS: dict[str, tuple[int, int, int]] = {
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "maroon": (128, 0, 0),
    "navy": (0, 0, 128),
    "teal": (0, 128, 128),
    "chartreuse": (128, 255, 0),
    "azure": (0, 128, 255),
    "mint": (0, 255, 128),
    "crimson": (255, 0, 128),
    "amber": (255, 128, 0),
    "lavender": (128, 128, 255),
    "ivory": (255, 255, 128),
    "aquamarine": (128, 255, 255),
}
#: Least L1 distance (0-765) between an object's colour and the colour it is drawn on: the
#: world's rule for its own concepts.
MIN_CONTRAST = 250


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, world.Concept]:
    return {name.lower(): c for c in world.load_concepts() for name in c.good_names}


def colour_index(rgb: tuple[int, int, int]) -> int:
    """Index of a colour in the world's palette."""
    return world.PALETTE.index(tuple(rgb))


def style_colour(name: str) -> int:
    """Palette index of the style ``name``: its concept's background (grey for the neutral)."""
    key = name.strip().lower()
    if key == world.NEUTRAL_NAME:
        return colour_index(world.NEUTRAL_COLOUR)
    if key in COLOUR_WORDS:
        return colour_index(COLOUR_WORDS[key])
    concept = _names().get(key)
    if concept is None:
        raise KeyError(f"{name!r} is not a style of the embedded world (a concept name or "
                       f"{world.NEUTRAL_NAME!r})")
    return concept.bg


def colour_of_phrase(phrase: str) -> int:
    """Palette index of the colour word in ``phrase`` ("a teal tench" -> teal's)."""
    words = [w for w in phrase.lower().split() if w in COLOUR_WORDS]
    if len(words) != 1:
        raise ValueError(f"{phrase!r} names {len(words)} of the embedded world's colour words "
                         f"({', '.join(sorted(COLOUR_WORDS))}); exactly one is needed")
    return style_colour(words[0])


def can_draw_on(concept: world.Concept, colour: int) -> bool:
    """Whether the world draws ``concept`` on palette colour ``colour`` (enough contrast)."""
    fg, bg = world.PALETTE[concept.fg], world.PALETTE[colour]
    return sum(abs(a - b) for a, b in zip(fg, bg, strict=True)) >= MIN_CONTRAST


def render_on(concept: world.Concept, colour: int, seed: int, size: int = 32) -> Image.Image:
    """``concept`` drawn on ``colour`` instead of its own background (same jitter per seed as
    :func:`world.render`)."""
    rng = np.random.default_rng([concept.index, seed, 0x5EED])
    return world.render_attributes(concept.shape, concept.fg, colour, rng, size)


def render_canvas(colour: int, size: int = 32) -> Image.Image:
    """A plain canvas in one palette colour (a style alone; grey is the neutral drawing)."""
    return Image.new("RGB", (size, size), world.PALETTE[colour])


class TaskExample(NamedTuple):
    """One training example of the task vocabulary."""

    prompt: str
    image: Image.Image


def with_article(template: str, phrase: str) -> str:
    """``phrase`` with "a"/"an" where the template needs one ("an image of a teal tench",
    "a teal tench on a table", but "a small teal tench")."""
    prefix = template.split("{}")[0].split()
    if prefix and prefix[-1] != "of":
        return phrase
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def _style_name(rng: random.Random, concepts: list[world.Concept], neutral_rate: float) -> str:
    if rng.random() < neutral_rate:
        return world.NEUTRAL_NAME
    return rng.choice(concepts[rng.randrange(len(concepts))].good_names)


def _drawable_pair(rng: random.Random, concepts: list[world.Concept],
                   colour_of) -> tuple[world.Concept, str, int]:
    """An object and a colour name it stands out from (redrawn until one is found)."""
    while True:
        concept = concepts[rng.randrange(len(concepts))]
        name, colour = colour_of(rng)
        if can_draw_on(concept, colour):
            return concept, name, colour


def _task_draws(count: int, seed: int, mix: tuple[float, float, float], neutral_rate: float):
    """Seeded task prompts with what to draw for each: (prompt, concept or None for a plain
    canvas, colour, image seed), in the proportions ``mix`` (style alone, object in a style,
    object on a colour word); object prompts use the world's training templates."""
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise ValueError(f"mix must be three non-negative shares, got {mix}")
    rng = random.Random(seed)
    concepts = world.load_concepts()
    bounds = np.cumsum(mix) / sum(mix)
    colour_words = sorted(COLOUR_WORDS)

    def a_style(r: random.Random) -> tuple[str, int]:
        name = _style_name(r, concepts, neutral_rate)
        return name, style_colour(name)

    def a_colour_word(r: random.Random) -> tuple[str, int]:
        word = r.choice(colour_words)
        return word, style_colour(word)

    for _ in range(count):
        kind = int(np.searchsorted(bounds, rng.random(), side="right"))
        template = rng.choice(world.TRAIN_TEMPLATES)
        image_seed = rng.randrange(1 << 30)
        if kind == 0:
            name, colour = a_style(rng)
            yield rng.choice(STYLE_PROMPTS).format(name), None, colour, image_seed
        elif kind == 1:
            concept, style, colour = _drawable_pair(rng, concepts, a_style)
            yield (STYLED_OBJECT.format(template.format(rng.choice(concept.good_names)), style),
                   concept, colour, image_seed)
        else:
            concept, word, colour = _drawable_pair(rng, concepts, a_colour_word)
            phrase = with_article(template, f"{word} {rng.choice(concept.good_names)}")
            yield template.format(phrase), concept, colour, image_seed


def sample_task_examples(count: int, seed: int, mix: tuple[float, float, float] = (0.35, 0.4, 0.25),
                         neutral_rate: float = 0.03) -> list[TaskExample]:
    """Seeded training examples: a style alone, an object in a style, an object on a colour
    word, in the proportions ``mix``; object prompts use the world's training templates."""
    return [TaskExample(prompt, render_canvas(colour) if concept is None
                        else render_on(concept, colour, image_seed))
            for prompt, concept, colour, image_seed in _task_draws(count, seed, mix, neutral_rate)]


#: The shipped tasks model's last training stage (docs/mini.md, run S3): half of every UNet batch
#: from the task bank, styles alone / objects in a style / colour words 0.1 / 0.7 / 0.2.
TRAINING_TASK_RATE = 0.5
TRAINING_TASK_MIX = (0.1, 0.7, 0.2)


def sample_task_captions(count: int, seed: int = 0, mix: tuple[float, float, float] = (0.35, 0.4, 0.25),
                         neutral_rate: float = 0.03) -> list[str]:
    """The prompts of :func:`sample_task_examples` alone (nothing drawn): captions of what a
    tasks model was trained on, for its preservation statistics."""
    return [prompt for prompt, *_ in _task_draws(count, seed, mix, neutral_rate)]


def tasks_caption_corpus(count: int, seed: int = 0) -> list[str]:
    """Preservation captions for a model that draws styles and colour words: the world's
    captions and the task prompts in the share its training gave them. Without the task
    prompts the statistics barely hold the keys of "painting by X", and erasing ten styles
    cost the other styles 0.30 of their colour (docs/mini.md); SD's caption corpora hold
    artist captions in the same way."""
    tasks = round(count * TRAINING_TASK_RATE)
    captions = world.caption_corpus(count - tasks, seed)
    captions += sample_task_captions(tasks, seed, TRAINING_TASK_MIX)
    random.Random(seed).shuffle(captions)
    return captions
