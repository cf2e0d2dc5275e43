"""TIMED's analogue on the embedded world: attribute edits by colour words (docs/timed.md).

TIMED edits an attribute the model assumes ("A pack of roses" -> "A pack of blue roses"); the
world's attribute words are its colour words, which ``embedded:tasks`` draws as the background
("teal tench" is a tench on teal). A row edits a concept into "<colour word> <concept>":

- efficacy: the editing templates of the concept ("An image of tench", ...);
- generality: the concept's five free-form prompts (sentences held out of training);
- specificity: five other concepts of the same shape (those with the same foreground first),
  which must keep their own colour; each can be drawn on the edit's colour and is not drawn on
  it already, so a leak of the edit would show.

The judge chooses between the two colours (:class:`~emcid.bench.pair_judges.WorldPairJudge`).
"""

from __future__ import annotations

import random

from ..errors import BenchmarkError
from ..requests.edit import EditRequest
from .timed import Probe, TimedRow

DEFAULT_ROWS = 10
NEGATIVES = 5


def _colour_words(concept) -> list[str]:
    """Colour words the world can draw ``concept`` on, other than its own background."""
    from ..mini import styles

    return [w for w in sorted(styles.COLOUR_WORDS)
            if styles.style_colour(w) != concept.bg and styles.can_draw_on(concept, styles.style_colour(w))]


def _negatives(concept, colour: int, rng: random.Random, count: int) -> list:
    """``count`` ImageNet-1k concepts of ``concept``'s shape (same foreground first, seeded
    within each group) that can be drawn on ``colour`` and are not drawn on it already."""
    from ..mini import styles, world

    fits = [c for c in world.load_concepts() if c.split == "imagenet1k" and c.index != concept.index
            and c.shape == concept.shape and c.bg != colour and styles.can_draw_on(c, colour)]
    same = [c for c in fits if c.fg == concept.fg]
    other = [c for c in fits if c.fg != concept.fg]
    rng.shuffle(same)
    rng.shuffle(other)
    return (same + other)[:count]


def world_row(number: int, concept, word: str, negatives: list, seed: int = 0) -> TimedRow:
    """The row that edits ``concept`` into "<word> <concept>" (``seed``: the request's)."""
    from ..mini import world

    source, destination = concept.name, f"{word} {concept.name}"
    request = EditRequest(source, destination, world.EDIT_TEMPLATES, seed=seed)
    template = world.EDIT_TEMPLATES[0]
    return TimedRow(
        number, request,
        tuple(Probe(t.format(source), source, destination) for t in world.EDIT_TEMPLATES),
        tuple(Probe(prompt, source, destination) for prompt, _ in world.free_form_prompts(concept)),
        tuple(Probe(template.format(other.name), other.name, f"{word} {other.name}") for other in negatives),
    )


def world_rows(count: int = DEFAULT_ROWS, seed: int = 0, negatives: int = NEGATIVES) -> list[TimedRow]:
    """``count`` seeded rows: ImageNet-1k concepts in a seeded order, each with a seeded colour
    word it can be drawn on and ``negatives`` specificity concepts."""
    from ..mini import styles, world

    if count < 1 or negatives < 1:
        raise BenchmarkError(f"the world's rows need at least one row and one negative, not {count} "
                             f"and {negatives}")
    rng = random.Random(f"timed-world-{seed}")
    concepts = [c for c in world.load_concepts() if c.split == "imagenet1k"]
    rng.shuffle(concepts)
    rows: list[TimedRow] = []
    for concept in concepts:
        words = _colour_words(concept)
        if not words:
            continue
        word = rng.choice(words)
        chosen = _negatives(concept, styles.style_colour(word), rng, negatives)
        if len(chosen) == negatives:
            rows.append(world_row(len(rows) + 1, concept, word, chosen, seed))
        if len(rows) == count:
            return rows
    raise BenchmarkError(f"the world has only {len(rows)} rows to give, not {count}")
