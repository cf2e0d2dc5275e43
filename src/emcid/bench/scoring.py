"""ICEB scoring: a bank of (prompt, seed) images, judged before and after an edit, and the
metrics of one scale (docs/iceb.md).

Pre-edit images go through the image cache (drawn once per model, prompt and seed);
post-edit images are drawn fresh for each edit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core import generation
from ..core.bundle import ModelBundle
from ..core.cache import TensorCache
from ..requests.edit import EditRequest
from . import metrics
from .judges import Judge
from .prompts import template_seed
from .worlds import BenchClass, World

METRICS = ("source_forget_efficacy", "source2dest_efficacy", "source_forget_generalization",
           "source2dest_generalization", "alias2dest", "holdout_delta")


class ImageBank:
    """Unique (prompt, seed) pairs, each with a fixed row in the probability tables."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.seeds: list[int] = []
        self._rows: dict[tuple[str, int], int] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[int, ...]:
        rows = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            key = (prompt, int(seed))
            if key not in self._rows:
                self._rows[key] = len(self.prompts)
                self.prompts.append(prompt)
                self.seeds.append(int(seed))
            rows.append(self._rows[key])
        return tuple(rows)


class Scorer:
    """Generates images for bank rows and judges them; pre-edit images go through the cache."""

    def __init__(self, bundle: ModelBundle, judge: Judge, bank: ImageBank, cache: TensorCache,
                 batch_size: int | None = None, chunk_size: int = 512, progress: bool = True):
        self.bundle, self.judge, self.bank, self.cache = bundle, judge, bank, cache
        self.batch_size, self.chunk_size, self.progress = batch_size, chunk_size, progress
        self.pre = torch.zeros(0, 0)
        self.kept: dict[str, dict[int, torch.Tensor]] = {}  # post-edit images for the report
        self.keep: set[int] = set()
        self.pre_seconds = 0.0

    def _score(self, rows: list[int], cached: bool, desc: str, keep_as: str | None) -> torch.Tensor:
        out = []
        chunk = self.chunk_size
        starts = range(0, len(rows), chunk)
        for start in tqdm(starts, desc=desc, unit="chunk", disable=not self.progress or not rows):
            part = rows[start:start + chunk]
            prompts = [self.bank.prompts[r] for r in part]
            seeds = [self.bank.seeds[r] for r in part]
            if cached:
                arrays = generation.generate_cached(self.bundle, prompts, seeds, self.cache,
                                                    batch_size=self.batch_size, progress=False)
            else:
                arrays = generation.generate_arrays(self.bundle, prompts, seeds,
                                                    batch_size=self.batch_size, progress=False)
            probs = self.judge.predict_proba(generation.to_pil(arrays)).float().cpu()
            out.append(probs)
            for row, image in zip(part, arrays):
                if keep_as is not None and row in self.keep:
                    self.kept.setdefault(keep_as, {})[row] = image.clone()
        return torch.cat(out) if out else torch.zeros(0, 0)

    def ensure_pre(self) -> torch.Tensor:
        """Probabilities of the unedited model for every bank row (new rows scored once)."""
        done = self.pre.shape[0]
        if done < len(self.bank):
            start = time.perf_counter()
            fresh = self._score(list(range(done, len(self.bank))), True, "pre-edit images", None)
            self.pre = fresh if done == 0 else torch.cat([self.pre, fresh])
            self.pre_seconds += time.perf_counter() - start
        return self.pre

    def images(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """Images of the model as it is now, through the cache (for the report's grids)."""
        return generation.generate_cached(self.bundle, list(prompts), list(seeds), self.cache,
                                          batch_size=self.batch_size, progress=False)

    def pre_images(self, rows: Sequence[int]) -> torch.Tensor:
        """Pre-edit images of bank rows (from the cache)."""
        return self.images([self.bank.prompts[r] for r in rows], [self.bank.seeds[r] for r in rows])

    def post(self, rows: Sequence[int], label: str | None) -> torch.Tensor:
        """Probabilities of the (edited) model now loaded for ``rows``; other rows are NaN.

        With a ``label``, the images of rows in ``keep`` are kept under it for the report.
        """
        if self.pre.shape[0] != len(self.bank):  # pre-edit images must come from the unedited model
            raise RuntimeError("score every pre-edit image (ensure_pre) before editing the model")
        table = torch.full_like(self.pre, float("nan"))
        unique = sorted(set(rows))
        if unique:
            table[unique] = self._score(unique, False, "post-edit images", label)
        return table


def template_group(bank: ImageBank, world: World, cls: BenchClass, name: str, key: str, source: int,
                    destination: int = -1) -> metrics.ImageGroup:
    prompts = [t.format(name) for t in world.templates]
    seeds = [template_seed(cls.index, i) for i in range(len(world.templates))]
    return metrics.ImageGroup(key, bank.add(prompts, seeds), source, destination)


def free_form_group(bank: ImageBank, cls: BenchClass, name: str, key: str, source: int,
                     destination: int) -> metrics.ImageGroup | None:
    if not cls.free_form:
        return None
    rows = bank.add([t.format(name) for t, _ in cls.free_form], [s for _, s in cls.free_form])
    return metrics.ImageGroup(key, rows, source, destination)


@dataclass
class EditItem:
    """One edit of a subtask with its image groups."""

    request: EditRequest
    source_index: int
    destination_index: int
    efficacy: metrics.ImageGroup
    generalization: metrics.ImageGroup | None
    aliases: list[metrics.ImageGroup]

    def rows(self) -> list[int]:
        groups = [self.efficacy, self.generalization, *self.aliases]
        return [r for g in groups if g is not None for r in g.rows]

    def describe(self) -> dict:
        return {"source": self.request.source, "destination": self.request.destination,
                "source_index": self.source_index, "destination_index": self.destination_index,
                "reference_images": bool(self.request.reference_images)}


def scale_metrics(pre: torch.Tensor, post: torch.Tensor, items: Sequence[EditItem],
                  holdout: Sequence[metrics.ImageGroup]) -> dict:
    """All ICEB metrics of one scale, with per-class values and absolute pre/post scores."""
    efficacy = [i.efficacy for i in items]
    general = [i.generalization for i in items if i.generalization is not None]
    aliases = [g for i in items for g in i.aliases]
    values = {
        "source_forget_efficacy": metrics.source_forget(pre, post, efficacy),
        "source2dest_efficacy": metrics.source2dest(pre, post, efficacy),
        "source_forget_generalization": metrics.source_forget(pre, post, general),
        "source2dest_generalization": metrics.source2dest(pre, post, general),
        "alias2dest": metrics.source2dest(pre, post, aliases),
        "holdout_delta": metrics.holdout_delta(pre, post, holdout),
    }
    result: dict = {name: values[name].value for name in METRICS}
    result["per_class"] = {name: values[name].per_class for name in METRICS}
    dest_groups = [metrics.ImageGroup(g.key, g.rows, g.destination) for g in efficacy]
    result["scores"] = {
        "pre_source_efficacy": metrics.own_class_score(pre, efficacy).value,
        "post_source_efficacy": metrics.own_class_score(post, efficacy).value,
        "pre_destination_efficacy": metrics.own_class_score(pre, dest_groups).value,
        "post_destination_efficacy": metrics.own_class_score(post, dest_groups).value,
        "pre_holdout": metrics.own_class_score(pre, holdout).value,
        "post_holdout": metrics.own_class_score(post, holdout).value,
    }
    return result
