"""Style erasure on the embedded world: the artist task's benchmark, measured by the world's
judge on generated images (emcid/mini/styles.py; docs/iceb.md, "Styles").

A style is a concept name; its colour is that concept's background. The "artists" are the
world's 1,000 ImageNet-21k concepts in a seeded order; a scale of N erases the first N (each
towards the world's neutral concept, whose style is grey) with the artist task's presets.
Held-out styles and objects are ImageNet-1k concepts.
Every figure is measured on the same prompts and seeds before and after the edit:

- **erased styles**: share of images of their prompts that still show the style's colour
  (the release's three artist prompts alone, and two objects "in the style of" it);
  *efficacy* is before minus after, and *to neutral* the share drawn on grey after the edit;
- **other styles**: the same share for held-out styles; *delta* is after minus before;
- **objects**: the judge's top-1 on "An image of Y" for held-out objects; *delta* likewise;
- **image distance**: between each erased and held style's image before and after the edit
  (same prompt and seed): LPIPS where it runs offline, else its analogue on the judge's
  features (emcid/bench/quality.py).

Styles whose colour is the neutral grey are erased with the others but left out of the style
figures: erasing them to grey changes nothing a judge can see. One style is a sample of five
images, so scale 1 is the mean of several single-style erasures (``singles``), each from the
unedited model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice

import torch

from ..core.bundle import ModelBundle
from ..core.generation import generate_arrays, to_pil
from ..requests.edit import EditRequest

OBJECT_TEMPLATE = "An image of {}"
OBJECTS_PER_STYLE = 2


@dataclass(frozen=True)
class StyleProbe:
    """Prompts and seeds of one style, and the colour they should show."""

    style: str
    colour: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass
class StyleSplit:
    """The styles a sweep erases (in order), the held-out styles and objects it watches."""

    artists: list[str]
    held_styles: list[str]
    held_objects: list[int] = field(default_factory=list)  # concept indices


def style_split(seed: int = 0, held_styles: int = 100, held_objects: int = 100) -> StyleSplit:
    """Artists: the 1,000 ImageNet-21k concepts' class names in a seeded order. Held-out styles
    and held-out objects: disjoint seeded samples of the ImageNet-1k concepts."""
    from ..mini import world

    concepts = world.load_concepts()
    extra = [c.name for c in concepts if c.split == "extra"]
    random.Random(f"styles-{seed}").shuffle(extra)
    pool = [c.index for c in concepts if c.split == "imagenet1k"]
    chosen = random.Random(f"style-holdout-{seed}").sample(pool, held_styles + held_objects)
    return StyleSplit(extra, [concepts[i].name for i in sorted(chosen[:held_styles])],
                      sorted(chosen[held_styles:]))


def style_probe(style: str, seed: int = 0) -> StyleProbe:
    """The release's artist prompts with ``style``, and "An image of Y in the style of X" for
    ``OBJECTS_PER_STYLE`` ImageNet-1k objects that stand out from the style's colour."""
    from ..mini import styles, world

    colour = styles.style_colour(style)
    rng = random.Random(f"style-probe-{seed}-{style}")
    objects = [c for c in world.load_concepts() if c.split == "imagenet1k" and styles.can_draw_on(c, colour)]
    picked = rng.sample(objects, OBJECTS_PER_STYLE)
    prompts = [t.format(style) for t in styles.STYLE_PROMPTS]
    prompts += [styles.STYLED_OBJECT.format(OBJECT_TEMPLATE.format(c.name), style) for c in picked]
    return StyleProbe(style, colour, tuple(prompts), tuple(rng.randrange(1 << 30) for _ in prompts))


def _images(bundle: ModelBundle, prompts: Sequence[str], seeds: Sequence[int], progress: bool):
    return to_pil(generate_arrays(bundle, list(prompts), list(seeds), progress=progress))


def probe_images(bundle: ModelBundle, probes: Sequence[StyleProbe], progress: bool = False) -> list[list]:
    """Each probe's images, one per prompt with its seed."""
    prompts = [p for probe in probes for p in probe.prompts]
    seeds = [s for probe in probes for s in probe.seeds]
    images = iter(_images(bundle, prompts, seeds, progress)) if prompts else iter(())
    return [list(islice(images, len(probe.prompts))) for probe in probes]


def colours_in(judge, images: Sequence[Sequence]) -> torch.Tensor:
    """The background colour the judge sees in each probe's images, [probes, prompts]."""
    if not images:
        return torch.zeros(0, 0, dtype=torch.long)
    found = judge.background_proba([i for row in images for i in row]).argmax(1)
    return found.view(len(images), -1)


def found_colours(bundle: ModelBundle, judge, probes: Sequence[StyleProbe],
                  progress: bool = False) -> torch.Tensor:
    """The background colour the judge sees in each probe's images, [probes, prompts]."""
    return colours_in(judge, probe_images(bundle, probes, progress))


def is_visible(probe: StyleProbe) -> bool:
    """Whether erasing the style to the neutral concept can show: its colour is not grey."""
    from ..mini import styles, world

    return probe.colour != styles.colour_index(world.NEUTRAL_COLOUR)


def kept_share(found: torch.Tensor, probes: Sequence[StyleProbe]) -> float:
    """Share of images that show their style's colour."""
    wanted = torch.tensor([probe.colour for probe in probes])[:, None]
    return float((found == wanted).float().mean())


def neutral_share(found: torch.Tensor) -> float:
    """Share of images drawn on the neutral concept's grey (an erased style's destination)."""
    from ..mini import styles, world

    return float((found == styles.colour_index(world.NEUTRAL_COLOUR)).float().mean())


def visible_rows(probes: Sequence[StyleProbe]) -> list[int]:
    """Rows of the styles whose erasure can show (colour not grey)."""
    return [i for i, probe in enumerate(probes) if is_visible(probe)]


def object_hits(bundle: ModelBundle, judge, objects: Sequence[int], seed: int = 0,
                progress: bool = False) -> torch.Tensor:
    """Whether the judge's top-1 is right on "An image of Y", two seeds per object."""
    from ..mini import world

    concepts = world.load_concepts()
    prompts = [OBJECT_TEMPLATE.format(concepts[i].name) for i in objects for _ in range(2)]
    seeds = [seed + 7 * i + k for i in objects for k in range(2)]
    truth = torch.tensor([i for i in objects for _ in range(2)])
    return judge.predict_proba(_images(bundle, prompts, seeds, progress)).argmax(1) == truth


def erase_requests(styles: Sequence[str]) -> list[EditRequest]:
    """Erase requests (destination "") with the release's artist prompts."""
    from ..concepts import ARTIST_PROMPTS

    return [EditRequest(style, "", ARTIST_PROMPTS) for style in styles]


def image_distance(name: str, judge):
    """The before/after image distance ``name``: "lpips" (lpips' AlexNet LPIPS, where it runs
    offline) or "judge" (its analogue on the world judge's features)."""
    from ..errors import OptionError
    from . import quality

    if name == "judge":
        return partial(quality.judge_distance, judge)
    if name == "lpips":
        return partial(quality.lpips_distance, quality.lpips_model())
    raise OptionError(f"unknown image distance {name!r}; choose from judge, lpips")


def run_style_sweep(bundle: ModelBundle, judge, scales: Sequence[int], method: str = "emcid",
                    seed: int = 0, held_styles: int = 100, held_objects: int = 100,
                    singles: int = 8, progress: bool = True, distance: str = "judge",
                    **options) -> dict[int, dict]:
    """Erase the first N artists for every N in ``scales`` (each from the unedited model) and
    return each scale's figures; the model is restored after every scale. Scale 1 is the
    mean over the first ``singles`` artists whose erasure shows, each erased alone (its
    ``"singles"`` entry lists them). ``distance`` (:func:`image_distance`) compares each
    image before and after the edit."""
    from ..errors import OptionError

    split = style_split(seed, held_styles, held_objects)
    if not scales or min(scales) < 1 or max(scales) > len(split.artists):
        raise OptionError(f"style scales must be between 1 and {len(split.artists)}, got {list(scales)}")
    if singles < 1:
        raise OptionError(f"singles must be at least 1, got {singles}")
    measure = image_distance(distance, judge)
    erased = [style_probe(s, seed) for s in split.artists[:max(scales)]]
    every = (style_probe(s, seed) for s in split.artists)  # probed only as far as needed
    alone = list(islice((p for p in every if is_visible(p)), singles)) if 1 in scales else []
    held = [style_probe(s, seed) for s in split.held_styles]
    watched = erased + [p for p in alone if p not in erased]
    before = _readings(bundle, judge, watched, held, split.held_objects, seed, progress)
    by_probe = dict(zip(watched, before[0], strict=True))
    pictures = dict(zip(watched, before[3], strict=True))

    def edited(erasing: list[StyleProbe]) -> dict:
        after = _edited_readings(bundle, judge, erasing, held, split.held_objects, method, seed,
                                 progress, options)
        figures = scale_figures((torch.stack([by_probe[p] for p in erasing]), *before[1:]), after,
                                erasing, held)
        return {**figures, **distance_figures(measure, ([pictures[p] for p in erasing], after[3]),
                                              (before[4], after[4]), erasing, held)}

    results = {}
    for count in sorted(scales):
        if count == 1:
            runs = [edited([probe]) for probe in alone]
            results[1] = _mean_figures(runs)
            results[1]["singles"] = [{"style": p.style, **r} for p, r in zip(alone, runs, strict=True)]
        else:
            results[count] = edited(erased[:count])
    return results


def _mean_figures(runs: list[dict]) -> dict:
    """The mean of several scales' figures, key by key (nested ones too; None where a run
    had nothing to measure is left out of the mean)."""
    means = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            means[key] = _mean_figures([r[key] for r in runs])
        else:
            given = [r[key] for r in runs if r[key] is not None]
            means[key] = sum(given) / len(given) if given else None
    return means


def _readings(bundle: ModelBundle, judge, erased: Sequence[StyleProbe], held: Sequence[StyleProbe],
              objects: Sequence[int], seed: int, progress: bool) -> tuple:
    """The judge's readings of the erased and held styles' images, the object hits, and the
    erased and held styles' images."""
    erased_images, held_images = probe_images(bundle, erased, progress), probe_images(bundle, held, progress)
    return (colours_in(judge, erased_images), colours_in(judge, held_images),
            object_hits(bundle, judge, objects, seed, progress), erased_images, held_images)


def _edited_readings(bundle: ModelBundle, judge, erasing: list[StyleProbe], held: Sequence[StyleProbe],
                     objects: Sequence[int], method: str, seed: int, progress: bool,
                     options: dict) -> tuple:
    """:func:`_readings` with ``erasing``'s styles erased; the model is restored after."""
    import emcid

    patch = emcid.edit(bundle, erase_requests([p.style for p in erasing]), method, task="artist",
                       progress=progress, **options)
    with patch.applied(bundle):
        return _readings(bundle, judge, erasing, held, objects, seed, progress)


def scale_figures(before: tuple, after: tuple, erased: Sequence[StyleProbe],
                  held: Sequence[StyleProbe]) -> dict:
    """One scale's figures from the judge's readings before and after the edit, over the
    styles whose erasure can show."""
    from ..mini.styles import STYLE_PROMPTS

    alone = len(STYLE_PROMPTS)  # a probe's first prompts name the style alone (style_probe)
    rows, held_rows = visible_rows(erased), visible_rows(held)
    shown, held_shown = [erased[i] for i in rows], [held[i] for i in held_rows]
    erased_before, erased_after = before[0][:len(erased)][rows], after[0][rows]
    held_before, held_after = before[1][held_rows], after[1][held_rows]
    kept_before, kept_after = kept_share(erased_before, shown), kept_share(erased_after, shown)
    other_before = kept_share(held_before, held_shown)
    objects_before = float(before[2].float().mean())
    colours = {probe.colour for probe in shown}
    shared = [i for i, probe in enumerate(held_shown) if probe.colour in colours]
    apart = [i for i, probe in enumerate(held_shown) if probe.colour not in colours]
    return {
        "erased_kept_before": kept_before,
        "erased_kept_after": kept_after,
        "efficacy": kept_before - kept_after,
        # the style named alone ("painting by X", the prompts Stage I sees) and objects drawn
        # in it ("An image of Y in the style of X", prompts it never sees)
        "efficacy_alone": _efficacy(erased_before, erased_after, shown, slice(0, alone)),
        "efficacy_styled": _efficacy(erased_before, erased_after, shown, slice(alone, None)),
        "to_neutral": neutral_share(erased_after),
        "other_styles_before": other_before,
        "other_styles_delta": kept_share(held_after, held_shown) - other_before,
        # in this world a style is a colour: do held-out styles of an erased colour pay more?
        "other_styles_shared_colour": _delta_over(shared, held_before, held_after, held_shown),
        "other_styles_other_colour": _delta_over(apart, held_before, held_after, held_shown),
        "objects_before": objects_before,
        "objects_delta": float(after[2].float().mean()) - objects_before,
    }


def _efficacy(before: torch.Tensor, after: torch.Tensor, probes: Sequence[StyleProbe],
              columns: slice) -> float:
    """The drop of the kept share over some of each probe's prompts (``columns``)."""
    return kept_share(before[:, columns], probes) - kept_share(after[:, columns], probes)


def distance_figures(distance, erased_images: tuple, held_images: tuple, erased: Sequence[StyleProbe],
                     held: Sequence[StyleProbe]) -> dict:
    """Mean image distance between each image before and after the edit (same prompt and
    seed), over the erased and the held styles whose erasure can show; ``*_images`` are the
    (before, after) images per probe."""
    def mean(images: tuple, probes: Sequence[StyleProbe]) -> float | None:
        rows = visible_rows(probes)
        if not rows:
            return None
        before, after = ([i for r in rows for i in side[r]] for side in images)
        return float(distance(before, after).mean())

    return {"erased_distance": mean(erased_images, erased), "held_distance": mean(held_images, held)}


def _delta_over(rows: list[int], before: torch.Tensor, after: torch.Tensor,
                probes: Sequence[StyleProbe]) -> dict:
    """How many of ``probes`` (by row) there are and the change of their kept share."""
    if not rows:
        return {"styles": 0, "delta": None}
    chosen = [probes[i] for i in rows]
    return {"styles": len(rows), "delta": kept_share(after[rows], chosen) - kept_share(before[rows], chosen)}


def format_table(results: dict[int, dict]) -> str:
    """The sweep as a plain-text table (held-out styles split by whether an erased style has
    their colour; the image distances before vs after last)."""
    head = ("styles erased", "kept before", "kept after", "efficacy", "alone", "styled", "to grey",
            "other styles D", "same colour D", "other colour D", "objects D", "erased dist", "held dist")
    keys = ("erased_kept_before", "erased_kept_after", "efficacy", "efficacy_alone", "efficacy_styled",
            "to_neutral", "other_styles_delta", "other_styles_shared_colour", "other_styles_other_colour",
            "objects_delta", "erased_distance", "held_distance")
    lines = ["  ".join(f"{h:>14}" for h in head)]
    for count, figures in sorted(results.items()):
        label = f"1 (mean of {len(figures['singles'])})" if "singles" in figures else str(count)
        values = [figures[k]["delta"] if isinstance(figures[k], dict) else figures[k] for k in keys]
        lines.append("  ".join([f"{label:>14}"] + [f"{'-':>14}" if v is None else f"{v:>+14.3f}"
                                                   for v in values]))
    return "\n".join(lines)


def colour_debias_requests(count: int, seed: int = 0) -> list:
    """Debias requests of ``count`` ImageNet-1k concepts that the world draws on a named
    colour (a share of 1.00 / 0.00 before): values that word and a second, seeded one the
    concept can be drawn on."""
    from ..errors import OptionError
    from ..mini import styles, world
    from ..requests.debias import DebiasRequest

    named = {styles.style_colour(word): word for word in styles.COLOUR_WORDS}
    rng = random.Random(f"debias-mini-{seed}")
    candidates = [c for c in world.load_concepts() if c.split == "imagenet1k" and c.bg in named]
    if count > len(candidates):
        raise OptionError(f"only {len(candidates)} concepts are drawn on a named colour, not {count}")
    rng.shuffle(candidates)
    requests = []
    for concept in candidates[:count]:
        others = sorted(w for w in styles.COLOUR_WORDS
                        if w != named[concept.bg] and styles.can_draw_on(concept, styles.style_colour(w)))
        requests.append(DebiasRequest(concept.name, (named[concept.bg], rng.choice(others)), seed=seed))
    return requests
