"""ICEB, the ImageNet Concept Editing Benchmark (method.md section 7).

Two subtasks, each swept over a list of edit counts ("scales"):

* **AICE** (arbitrary ImageNet concept editing): every edit class becomes one of the five
  holdout classes nearest to it in the model's own text embedding of "an image of {}".
* **Rectification**: aliases the unedited model draws badly become the class's best alias.

Images of the unedited model are generated once per (prompt, seed) and cached, so a sweep
over scales, methods or seeds draws them once; the edited model is sampled on the same
prompts and seeds. Each scale's edit is applied, measured and reverted (bit-exact), and
the scales are nested (the first ``s`` edits of one seeded order), so scales differ only
in how many edits are made. Results go to ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import generation
from ..cache import TensorCache
from ..errors import EmcidError
from ..models import ModelBundle, load_model
from ..requests import EditRequest
from . import metrics
from .judges import Judge, default_judge_name, load_judge
from .prompts import template_seed
from .worlds import BenchClass, World, world_for

log = logging.getLogger(__name__)

DEFAULT_SCALES = (1, 10, 50, 100, 300, 1000)
SUBTASKS = ("aice", "rectification")
METRICS = ("source_forget_efficacy", "source2dest_efficacy", "source_forget_generalization",
           "source2dest_generalization", "alias2dest", "holdout_delta")
# Hyperparameters a method uses on a subtask unless the caller overrides them.
SUBTASK_OPTIONS = {("emcid", "aice"): {"alpha": 0.6}}  # release: a = 0.6 for arbitrary editing
# Options for classes the model cannot draw (reference images, method.md 6).
REFERENCE_OPTIONS = {"emcid": {"reference_stage1": {"target": "noise", "align_weight": 0.0}}}


class BenchmarkError(EmcidError, ValueError):
    """A benchmark cannot run as configured (bad settings, missing model or judge)."""


@dataclass
class IcebConfig:
    """Everything an ICEB run depends on besides the model, the method and the judge."""

    scales: tuple[int, ...] = DEFAULT_SCALES
    subtasks: tuple[str, ...] = SUBTASKS
    seed: int = 0  # split, edit order, destinations; image seeds are fixed per prompt
    options: dict = field(default_factory=dict)  # editor options, over SUBTASK_OPTIONS
    neighbours: int = 5  # release: destination among the 5 nearest holdout classes
    holdout_fraction: float = 0.5  # share of classes kept as holdout where none are holdout-only
    holdout_eval: int | None = None  # score Holdout Delta on at most this many holdout classes
    min_pre_score: float | None = None  # keep only classes the unedited model draws this well
    bad_alias_threshold: float = 0.1  # release: aliases scoring < 0.1 are rectified
    drawable_threshold: float = 0.5  # release: best alias < 0.5 -> reference images
    classes: tuple[int, ...] | None = None  # restrict the run to these class indices
    reference_dir: str | None = None  # real images for undrawable classes (SD models)
    batch_size: int = 64  # images per generation batch
    chunk_size: int = 512  # images generated and judged per step (bounds memory)
    grid_samples: int = 4  # edits and holdout classes shown in the report's image grids
    cache: bool = True
    cache_root: str | None = None  # None: $EMCID_CACHE
    progress: bool = True

    def __post_init__(self) -> None:
        self.scales = tuple(sorted({int(s) for s in self.scales}))
        self.subtasks = tuple(self.subtasks)
        if not self.scales or self.scales[0] < 1:
            raise BenchmarkError(f"scales must be positive edit counts, not {self.scales}")
        unknown = set(self.subtasks) - set(SUBTASKS)
        if unknown or not self.subtasks:
            raise BenchmarkError(f"unknown ICEB subtasks {sorted(unknown)}; choose from {SUBTASKS}")
        if not 0 < self.holdout_fraction < 1:
            raise BenchmarkError("holdout_fraction must be between 0 and 1")
        if self.classes is not None:
            self.classes = tuple(int(c) for c in self.classes)


# --- images and their judge scores -----------------------------------------------------


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

    def __init__(self, bundle: ModelBundle, judge: Judge, bank: ImageBank, config: IcebConfig):
        self.bundle, self.judge, self.bank, self.config = bundle, judge, bank, config
        root = Path(config.cache_root) if config.cache_root else None
        self.cache = TensorCache("images", root=root, enabled=config.cache)
        self.pre = torch.zeros(0, 0)
        self.kept: dict[str, dict[int, torch.Tensor]] = {}  # post-edit images for the report
        self.keep: set[int] = set()
        self.pre_seconds = 0.0

    def _score(self, rows: list[int], cached: bool, desc: str, keep_as: str | None) -> torch.Tensor:
        out = []
        chunk = self.config.chunk_size
        starts = range(0, len(rows), chunk)
        for start in tqdm(starts, desc=desc, unit="chunk", disable=not self.config.progress or not rows):
            part = rows[start:start + chunk]
            prompts = [self.bank.prompts[r] for r in part]
            seeds = [self.bank.seeds[r] for r in part]
            if cached:
                arrays = generation.generate_cached(self.bundle, prompts, seeds, self.cache,
                                                    batch_size=self.config.batch_size, progress=False)
            else:
                arrays = generation.generate_arrays(self.bundle, prompts, seeds,
                                                    batch_size=self.config.batch_size, progress=False)
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
                                          batch_size=self.config.batch_size, progress=False)

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


# --- choosing classes and destinations -------------------------------------------------


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


def choose_destinations(edit_classes: Sequence[BenchClass], holdout: Sequence[BenchClass],
                        edit_embeddings: torch.Tensor, holdout_embeddings: torch.Tensor,
                        seed: int, neighbours: int = 5) -> dict[int, int]:
    """Edit class index -> destination class index, drawn among its nearest holdout classes.

    Nearness is cosine similarity of the embeddings; each class's draw is seeded by the run
    seed and its own index only, so a class keeps its destination at every scale.
    """
    if not holdout:
        raise BenchmarkError("AICE needs at least one holdout class to draw destinations from")
    similarity = torch.nn.functional.normalize(edit_embeddings.double(), dim=-1) @ \
        torch.nn.functional.normalize(holdout_embeddings.double(), dim=-1).T
    destinations = {}
    for i, cls in enumerate(edit_classes):
        order = sorted(range(len(holdout)), key=lambda j: (-float(similarity[i, j]), holdout[j].index))
        nearest = [holdout[j].index for j in order[:neighbours]]
        destinations[cls.index] = random.Random(f"iceb-destination-{seed}-{cls.index}").choice(nearest)
    return destinations


# --- image groups ------------------------------------------------------------------------


def _template_group(bank: ImageBank, world: World, cls: BenchClass, name: str, key: str, source: int,
                    destination: int = -1) -> metrics.ImageGroup:
    prompts = [t.format(name) for t in world.templates]
    seeds = [template_seed(cls.index, i) for i in range(len(world.templates))]
    return metrics.ImageGroup(key, bank.add(prompts, seeds), source, destination)


def _free_form_group(bank: ImageBank, cls: BenchClass, name: str, key: str, source: int,
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
    needs_references: bool = False

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


# --- the run -----------------------------------------------------------------------------


class IcebRun:
    """One ICEB run: a model, a method, a judge, a world and a config."""

    def __init__(self, bundle: ModelBundle, method: str, judge: Judge, world: World, config: IcebConfig,
                 out: Path, judge_name: str):
        self.bundle, self.method, self.judge, self.world = bundle, method, judge, world
        self.config, self.out, self.judge_name = config, out, judge_name
        self.bank = ImageBank()
        self.scorer = Scorer(bundle, judge, self.bank, config)
        self.timings: dict[str, float] = {}
        classes = world.classes
        if config.classes is not None:
            wanted = set(config.classes)
            classes = [c for c in classes if c.index in wanted]
        if len(judge.class_names) <= max((c.index for c in classes), default=-1):
            raise BenchmarkError(f"the judge knows {len(judge.class_names)} classes, but ICEB class "
                             f"{max(c.index for c in classes)} is used: judge and world do not match")
        self.classes = classes
        self.grid_rows: dict[str, dict] = {}
        self.on_scale: Callable[[str, dict], None] = lambda subtask, scales: None

    # -- shared steps

    def _filter_drawable(self, classes: list[BenchClass]) -> tuple[list[BenchClass], dict]:
        """Keep the classes the unedited model draws with mean P(own) >= min_pre_score."""
        threshold = self.config.min_pre_score
        if threshold is None:
            return classes, {}
        groups = [_template_group(self.bank, self.world, c, c.name, c.name, c.index) for c in classes]
        pre = self.scorer.ensure_pre()
        scores = metrics.own_class_score(pre, groups).per_class
        kept = [c for c in classes if scores[c.name] >= threshold]
        log.info("%d of %d classes drawn with P(own) >= %.2f", len(kept), len(classes), threshold)
        return kept, {"threshold": threshold, "kept": len(kept), "of": len(classes)}

    def _holdout_groups(self, holdout: Sequence[BenchClass]) -> list[metrics.ImageGroup]:
        chosen = list(holdout)
        limit = self.config.holdout_eval
        if limit is not None and len(chosen) > limit:
            chosen = sorted(random.Random(f"iceb-holdout-{self.config.seed}").sample(chosen, limit),
                            key=lambda c: c.index)
        return [_template_group(self.bank, self.world, c, c.name, c.name, c.index) for c in chosen]

    def _edit(self, subtask: str, items: Sequence[EditItem]):
        """One patch for all items; undrawable sources use reference images (method.md 6)."""
        options = {**SUBTASK_OPTIONS.get((self.method, subtask), {}), **self.config.options}
        if any(i.needs_references for i in items):
            options = {**options, **REFERENCE_OPTIONS.get(self.method, {})}
        from .. import edit

        return edit(self.bundle, [i.request for i in items], self.method, progress=self.config.progress,
                    **options)

    def _sweep(self, subtask: str, items: list[EditItem], holdout: list[metrics.ImageGroup]) -> dict:
        """Edit, score and revert at each scale; returns {scale: {method: metrics}}."""
        scales = cap_scales(self.config.scales, len(items))
        results: dict[str, dict] = {}
        self._remember_grid(subtask, items, holdout, scales[-1] if scales else 0)
        pre = self.scorer.ensure_pre()
        for scale in tqdm(scales, desc=f"{subtask} scales", unit="scale", disable=not self.config.progress):
            chosen = items[:scale]
            started = time.perf_counter()
            patch = self._edit(subtask, chosen)
            edited = time.perf_counter()
            patch.apply(self.bundle)
            try:
                rows = [r for i in chosen for r in i.rows()] + [r for g in holdout for r in g.rows]
                post = self.scorer.post(rows, f"{subtask} {scale}" if scale == scales[-1] else None)
            finally:
                patch.revert(self.bundle)
            scored = time.perf_counter()
            entry = scale_metrics(pre, post, chosen, holdout)
            entry["n_edits"] = scale
            entry["timings"] = {"edit_s": edited - started, "post_images_s": scored - edited}
            results[str(scale)] = {self.method: entry}
            self.on_scale(subtask, {k: dict(v) for k, v in results.items()})
            log.info("%s %d edits: %s", subtask, scale,
                     ", ".join(f"{k}={entry[k]:.3f}" for k in METRICS if entry[k] is not None))
        return results

    def _remember_grid(self, subtask: str, items: list[EditItem], holdout: list[metrics.ImageGroup],
                       largest: int) -> None:
        count = self.config.grid_samples
        template = self.world.templates[0]
        # Each edit row ends with the unedited model's image of the destination, for comparison.
        edits = [(f"{i.request.source} -> {i.request.destination}", i.efficacy.rows,
                  (template.format(i.request.destination), template_seed(i.destination_index, 0)))
                 for i in items[:count]]
        kept = [(g.key, g.rows, None) for g in holdout[:count]]
        for _, rows, _ in edits + kept:
            self.scorer.keep.update(rows)
        self.grid_rows[subtask] = {"edits": edits, "holdout": kept, "scale": largest}

    def grid_images(self) -> dict:
        """{subtask: {"scale", "edits"/"holdout": [(label, pre, post, reference)]}} for the report.

        Call it with the model unedited: pre-edit and destination images come from the cache.
        """
        grids = {}
        for subtask, spec in self.grid_rows.items():
            post = self.scorer.kept.get(f"{subtask} {spec['scale']}", {})
            entry: dict = {"scale": spec["scale"]}
            for part in ("edits", "holdout"):
                entry[part] = []
                for label, rows, reference in spec[part]:
                    if not all(r in post for r in rows):
                        continue
                    pre = list(self.scorer.pre_images(rows))
                    extra = []
                    if reference is not None:
                        prompt, seed = reference
                        extra = list(self.scorer.images([prompt], [seed]))
                    entry[part].append((label, pre, [post[r] for r in rows], extra))
            grids[subtask] = entry
        return grids

    # -- subtasks

    def aice(self) -> dict:
        started = time.perf_counter()
        classes, filtered = self._filter_drawable(self.classes)
        pool, holdout = split_classes(classes, self.config.seed, self.config.holdout_fraction)
        largest = max(cap_scales(self.config.scales, len(pool)) or [0])
        edit_classes = pool[:largest]
        if not edit_classes or not holdout:
            raise BenchmarkError(f"AICE needs edit and holdout classes; have {len(pool)} and {len(holdout)}")
        destinations = choose_destinations(
            edit_classes, holdout, class_embeddings(self.bundle, edit_classes),
            class_embeddings(self.bundle, holdout), self.config.seed, self.config.neighbours)
        by_index = {c.index: c for c in classes}
        items = []
        for cls in edit_classes:
            dst = by_index[destinations[cls.index]]
            request = EditRequest(cls.name, dst.name, self.world.templates, seed=self.config.seed)
            items.append(EditItem(
                request, cls.index, dst.index,
                _template_group(self.bank, self.world, cls, cls.name, cls.name, cls.index, dst.index),
                _free_form_group(self.bank, cls, cls.name, cls.name, cls.index, dst.index),
                [_template_group(self.bank, self.world, cls, alias, alias, cls.index, dst.index)
                 for alias in cls.aliases],
            ))
        holdout_groups = self._holdout_groups(holdout)
        scales = self._sweep("aice", items, holdout_groups)
        self.timings["aice_s"] = time.perf_counter() - started
        return {
            "edits": [i.describe() for i in items],
            "holdout_classes": [c.name for c in holdout],
            "holdout_scored": [g.key for g in holdout_groups],
            "filter": filtered,
            "scales": scales,
        }

    def rectification(self) -> dict:
        started = time.perf_counter()
        config = self.config
        pool, holdout = split_classes(self.classes, config.seed, config.holdout_fraction)
        candidates = sorted((c for c in pool if len(c.names) > 1), key=lambda c: c.index)
        name_groups = {c.index: [_template_group(self.bank, self.world, c, n, n, c.index) for n in c.names]
                       for c in candidates}
        pre = self.scorer.ensure_pre()
        sources, skipped, name_scores = [], [], {}
        for cls in candidates:
            scores = metrics.own_class_score(pre, name_groups[cls.index]).per_class
            name_scores[cls.name] = scores
            best = max(cls.names, key=lambda n: (scores[n], -cls.names.index(n)))
            bad = [n for n in cls.names if n != best and scores[n] < config.bad_alias_threshold]
            drawable = scores[best] >= config.drawable_threshold
            sources.extend((cls, alias, best, drawable) for alias in bad)
        random.Random(f"iceb-rectification-{config.seed}").shuffle(sources)
        # Only the edits some scale uses get images: the largest scale's first sources.
        items = []
        for cls, alias, best, drawable in sources:
            if len(items) >= max(config.scales):
                break
            references = () if drawable else tuple(self.world.reference_images(cls, self.out))
            if not drawable and not references:
                skipped.append(alias)
                continue
            request = EditRequest(alias, best, self.world.templates, references, seed=config.seed)
            others = [n for n in cls.names if n != alias]
            items.append(EditItem(
                request, cls.index, cls.index,
                _template_group(self.bank, self.world, cls, alias, alias, cls.index, cls.index),
                _free_form_group(self.bank, cls, alias, alias, cls.index, cls.index),
                [_template_group(self.bank, self.world, cls, n, f"{alias} / {n}", cls.index, cls.index)
                 for n in others],
                needs_references=not drawable,
            ))
        if skipped:
            log.warning("rectification: %d aliases of undrawable classes skipped (no reference images;"
                        " give reference_dir)", len(skipped))
        rectified = {i.source_index for i in items}
        holdout_groups = self._holdout_groups([c for c in holdout if c.index not in rectified])
        scales = self._sweep("rectification", items, holdout_groups) if items else {}
        if not items:
            log.warning("rectification: no alias scores below %.2f; nothing to rectify",
                        config.bad_alias_threshold)
        self.timings["rectification_s"] = time.perf_counter() - started
        return {
            "edits": [i.describe() for i in items],
            "badly_drawn_aliases": len(sources),
            "skipped_aliases": skipped,
            "name_scores": name_scores,
            "holdout_scored": [g.key for g in holdout_groups],
            "scales": scales,
        }


def _versions() -> dict:
    import diffusers
    import transformers

    from ..editors.base import package_version

    return {"emcid": package_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _read_previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _merge_previous(results: dict, previous: dict) -> dict:
    """Keep other methods' entries from an earlier run of the same model, world, judge and seed."""
    same = all(previous.get(k) == results.get(k) for k in ("model_fingerprint", "world", "judge")) and \
        previous.get("settings", {}).get("seed") == results["settings"]["seed"]
    if not same:
        return results
    for subtask, data in results["subtasks"].items():
        old = previous.get("subtasks", {}).get(subtask, {}).get("scales", {})
        for scale, methods in old.items():
            for method, entry in methods.items():
                if method != results["method"]:
                    data["scales"].setdefault(scale, {})[method] = entry
    return results


def run_iceb(
    model: str | Path | ModelBundle | None = None,
    method: str = "emcid",
    edits: Sequence[int] = DEFAULT_SCALES,
    out: str | Path = "iceb",
    subtasks: Sequence[str] = SUBTASKS,
    seed: int = 0,
    device: str = "cpu",
    judge: Judge | str | None = None,
    options: dict | None = None,
    report: bool = True,
    allow_pickle: bool = False,
    dtype: str = "float32",
    **settings: object,
) -> dict:
    """Run ICEB on ``model`` with ``method`` and write ``out/results.json`` and ``out/report.html``.

    ``model`` is a loaded bundle, a diffusers folder / hub id, or None (the embedded model).
    ``judge`` is a judge object, a ViT checkpoint path / id, ``"mini"``, or None (chosen from
    the model). ``options`` go to the editor; ``settings`` are :class:`IcebConfig` fields.
    ``results.json`` is rewritten after every scale (``"complete": false`` until the end), so
    a long sweep that stops keeps what it measured; its caches make a rerun cheap.
    Returns the results dictionary.
    """
    started = time.perf_counter()
    config = IcebConfig(scales=tuple(edits), subtasks=tuple(subtasks), seed=seed,
                        options=dict(options or {}), **settings)
    bundle = model if isinstance(model, ModelBundle) else load_model(
        model, device=device, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_previous(out / "results.json")
    judge_name = judge if isinstance(judge, str) else (
        default_judge_name(bundle) if judge is None else str(getattr(judge, "source", type(judge).__name__)))
    judge_obj = load_judge(bundle, judge, device)
    world = world_for(bundle, config.reference_dir)
    run = IcebRun(bundle, method, judge_obj, world, config, out, judge_name)
    base_fingerprint = bundle.fingerprint()

    def write(complete: bool) -> None:
        merged = _merge_previous(results, previous)
        merged["complete"] = complete
        (out / "results.json").write_text(json.dumps(merged, indent=2))

    def on_scale(subtask: str, scales: dict) -> None:
        results["subtasks"].setdefault(subtask, {})["scales"] = scales
        write(complete=False)

    run.on_scale = on_scale
    results: dict = {
        "benchmark": "ICEB",
        "model": bundle.source,
        "family": bundle.family,
        "model_fingerprint": base_fingerprint,
        "world": world.name,
        "method": method,
        "judge": judge_name,
        "settings": {**asdict(config), "method_options": {
            s: {**SUBTASK_OPTIONS.get((method, s), {}), **config.options} for s in config.subtasks}},
        "sampling": dict(bundle.sampling),
        "versions": _versions(),
        "device": str(device),
        "dtype": str(bundle.dtype),
        "subtasks": {},
    }
    for subtask in config.subtasks:
        results["subtasks"][subtask] = getattr(run, subtask)()
        if bundle.fingerprint() != base_fingerprint:
            raise RuntimeError("the model was not restored after an ICEB edit")
    results["timings"] = {**run.timings, "pre_images_s": run.scorer.pre_seconds,
                          "total_s": time.perf_counter() - started}
    results["images"] = {"unique_prompts": len(run.bank)}
    results = _merge_previous(results, previous)
    if report:
        from .report import write_report

        results["report"] = write_report(results, out, run.grid_images())
    write(complete=True)
    log.info("ICEB results written to %s", out / "results.json")
    return results
