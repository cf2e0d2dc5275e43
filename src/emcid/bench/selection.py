"""ICEB class selection: the edit pool and holdout split, and destinations for AICE.

Every draw is seeded by the run seed (and a class's own index), so a class keeps its role
and its destination at every scale (docs/iceb.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..core.bundle import ModelBundle
from ..errors import BenchmarkError
from .worlds import BenchClass


def cap_scales(scales: Sequence[int], available: int) -> list[int]:
    """The requested scales that fit, plus ``available`` itself if a larger one was asked for."""
    return sorted({min(int(s), available) for s in scales if s > 0}) if available > 0 else []


def split_classes(classes: Sequence[BenchClass], seed: int,
                  holdout_fraction: float) -> tuple[list[BenchClass], list[BenchClass]]:
    """(edit pool in a seeded order, holdout classes).

    Holdout-only classes (the embedded world's extra concepts) are always holdout; then
    the edit pool is every other class. Otherwise a seeded ``holdout_fraction`` of the
    classes is held out.
    """
    pool = [c for c in classes if not c.holdout_only]
    fixed = [c for c in classes if c.holdout_only]
    random.Random(f"iceb-split-{seed}").shuffle(pool)
    if fixed:
        return pool, fixed
    count = max(1, round(holdout_fraction * len(pool))) if len(pool) > 1 else 0
    holdout = sorted(pool[len(pool) - count:], key=lambda c: c.index)
    return pool[:len(pool) - count], holdout


@torch.no_grad()
def class_embeddings(bundle: ModelBundle, classes: Sequence[BenchClass],
                     template: str = "an image of {}", batch_size: int = 256) -> torch.Tensor:
    """Unit-norm pooled text embeddings of ``template`` per class (encoders concatenated)."""
    parts = []
    for start in range(0, len(classes), batch_size):
        prompts = [template.format(c.name) for c in classes[start:start + batch_size]]
        pooled = bundle.encode(prompts).pooled
        parts.append(torch.cat([torch.nn.functional.normalize(p.float(), dim=-1) for p in pooled], -1).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 0)


DESTINATION_MODES = ("nearest", "random")


def check_destinations(mode: str) -> None:
    if mode not in DESTINATION_MODES:
        raise BenchmarkError(f"unknown destinations {mode!r}; choose from {', '.join(DESTINATION_MODES)}")


def choose_destinations(edit_classes: Sequence[BenchClass], holdout: Sequence[BenchClass],
                        edit_embeddings: torch.Tensor, holdout_embeddings: torch.Tensor,
                        seed: int, neighbours: int = 5, mode: str = "nearest") -> dict[int, int]:
    """Edit class index -> destination class index.

    ``nearest`` (the paper's protocol): drawn among the ``neighbours`` holdout classes nearest
    in cosine similarity of the embeddings, so it measures near edits only. ``random``: drawn
    uniformly from every holdout class (far edits, as users make them). Each class's draw is
    seeded by the run seed and its own index only, so a class keeps its destination at every
    scale.
    """
    if not holdout:
        raise BenchmarkError("AICE needs at least one holdout class to draw destinations from")
    check_destinations(mode)
    if mode == "random":
        return {cls.index: random.Random(f"iceb-random-destination-{seed}-{cls.index}").choice(holdout).index
                for cls in edit_classes}
    similarity = torch.nn.functional.normalize(edit_embeddings.double(), dim=-1) @ \
        torch.nn.functional.normalize(holdout_embeddings.double(), dim=-1).T
    destinations = {}
    for i, cls in enumerate(edit_classes):
        order = sorted(range(len(holdout)), key=lambda j: (-float(similarity[i, j]), holdout[j].index))
        nearest = [holdout[j].index for j in order[:neighbours]]
        destinations[cls.index] = random.Random(f"iceb-destination-{seed}-{cls.index}").choice(nearest)
    return destinations
