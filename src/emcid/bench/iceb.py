"""ICEB, the ImageNet Concept Editing Benchmark (docs/method.md, docs/iceb.md).

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

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.bundle import ModelBundle
from ..core.cache import TensorCache
from ..core.config import split_runtime
from ..core.loading import load_model
from ..editors import Editor, editor_class
from ..editors.presets import preset_options
from ..errors import BenchmarkError
from ..requests.edit import EditRequest
from ..tasks.edit import edit_patch
from . import metrics
from .judges import Judge, default_judge_name, load_judge
from .prompts import template_seed
from .results import ResultsWriter, versions
from .scoring import METRICS, EditItem, ImageBank, Scorer, free_form_group, scale_metrics, template_group
from .selection import cap_scales, check_destinations, choose_destinations, class_embeddings, split_classes
from .worlds import BenchClass, World, world_for

log = logging.getLogger(__name__)

DEFAULT_SCALES = (1, 10, 50, 100, 300, 1000)
SUBTASKS = ("aice", "rectification")
# Each subtask is also the editor's task: its presets (AICE's alpha 0.6, rectification's
# options for undrawable classes) are rows of emcid.editors.presets.

__all__ = ["DEFAULT_SCALES", "METRICS", "SUBTASKS", "BenchmarkError", "IcebConfig", "IcebRun",
           "run_iceb"]

@dataclass
class IcebConfig:
    """Everything an ICEB run depends on besides the model, the method and the judge."""

    scales: tuple[int, ...] = DEFAULT_SCALES
    subtasks: tuple[str, ...] = SUBTASKS
    seed: int = 0  # split, edit order, destinations; image seeds are fixed per prompt
    options: dict = field(default_factory=dict)  # editor options, over the subtask's presets
    neighbours: int = 5  # release: destination among the 5 nearest holdout classes
    destinations: str = "nearest"  # AICE: "nearest" (release) or "random" (any holdout class)
    holdout_fraction: float = 0.5  # share of classes kept as holdout where none are holdout-only
    holdout_eval: int | None = None  # score Holdout Delta on at most this many holdout classes
    min_pre_score: float | None = None  # keep only classes the unedited model draws this well
    bad_alias_threshold: float = 0.1  # release: aliases scoring < 0.1 are rectified
    drawable_threshold: float = 0.5  # release: best alias < 0.5 -> reference images
    classes: tuple[int, ...] | None = None  # restrict the run to these class indices
    reference_dir: str | None = None  # real images for undrawable classes (SD models)
    batch_size: int | None = None  # images per generation batch; None: the device's default
    chunk_size: int = 512  # images generated and judged per step (bounds memory)
    grid_samples: int = 4  # edits and holdout classes shown in the report's image grids
    cache: bool = True  # images, and the editor's Stage I targets and statistics
    cache_root: str | None = None  # None: $EMCID_CACHE (for the editor's caches too)
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
        check_destinations(self.destinations)

    def editor_runtime(self, editor: type[Editor]) -> dict:
        """The run's cache switches, for an editor that keeps caches."""
        runtime = {"cache": self.cache, "cache_root": self.cache_root}
        return {k: v for k, v in runtime.items() if k in editor.runtime_options}

    def select(self, classes: Sequence[BenchClass]) -> list[BenchClass]:
        """The world's classes this run uses (``classes`` restricts them)."""
        wanted = set(self.classes) if self.classes is not None else None
        return [c for c in classes if wanted is None or c.index in wanted]

    def check_scales(self, available: int) -> None:
        """A sweep asked for by name may not exceed the classes the run has (the default is capped)."""
        if self.scales != DEFAULT_SCALES and self.scales[-1] > available:
            raise BenchmarkError(f"{self.scales[-1]} edits asked for, but the run has {available} "
                                 "classes (edit and holdout together); give fewer --edits")


# --- the run -----------------------------------------------------------------------------


class IcebRun:
    """One ICEB run: a model, a method, a judge, a world and a config."""

    def __init__(self, bundle: ModelBundle, editors: dict[str, Editor], judge: Judge, world: World,
                 config: IcebConfig, out: Path, writer: ResultsWriter):
        self.bundle, self.editors, self.judge, self.world = bundle, editors, judge, world
        self.config, self.out, self.writer = config, out, writer
        self.bank = ImageBank()
        root = Path(config.cache_root) if config.cache_root else None
        self.scorer = Scorer(bundle, judge, self.bank, TensorCache("images", root=root, enabled=config.cache),
                             config.batch_size, config.chunk_size, config.progress)
        self.timings: dict[str, float] = {}
        classes = config.select(world.classes)
        if len(judge.class_names) <= max((c.index for c in classes), default=-1):
            raise BenchmarkError(f"the judge knows {len(judge.class_names)} classes, but ICEB class "
                                 f"{max(c.index for c in classes)} is used: judge and world do not match")
        self.classes = classes
        self.grid_rows: dict[str, dict] = {}

    # -- shared steps

    def _filter_drawable(self, classes: list[BenchClass]) -> tuple[list[BenchClass], dict]:
        """Keep the classes the unedited model draws with mean P(own) >= min_pre_score."""
        threshold = self.config.min_pre_score
        if threshold is None:
            return classes, {}
        groups = [template_group(self.bank, self.world, c, c.name, c.name, c.index) for c in classes]
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
        return [template_group(self.bank, self.world, c, c.name, c.name, c.index) for c in chosen]

    def _edit(self, subtask: str, items: Sequence[EditItem]):
        """One patch for all items (the subtask's editor; undrawable sources carry reference
        images, which its presets handle)."""
        return edit_patch(self.editors[subtask], self.bundle, [i.request for i in items],
                          progress=self.config.progress)

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
            with patch.applied(self.bundle):
                rows = [r for i in chosen for r in i.rows()] + [r for g in holdout for r in g.rows]
                post = self.scorer.post(rows, f"{subtask} {scale}" if scale == scales[-1] else None)
            scored = time.perf_counter()
            entry = scale_metrics(pre, post, chosen, holdout)
            entry["n_edits"] = scale
            entry["timings"] = {"edit_s": edited - started, "post_images_s": scored - edited}
            results[str(scale)] = {self.editors[subtask].name: entry}
            self.writer.scales(subtask, results)
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
            class_embeddings(self.bundle, holdout), self.config.seed, self.config.neighbours,
            self.config.destinations)
        by_index = {c.index: c for c in classes}
        items = []
        for cls in edit_classes:
            dst = by_index[destinations[cls.index]]
            request = EditRequest(cls.name, dst.name, self.world.templates, seed=self.config.seed)
            items.append(EditItem(
                request, cls.index, dst.index,
                template_group(self.bank, self.world, cls, cls.name, cls.name, cls.index, dst.index),
                free_form_group(self.bank, cls, cls.name, cls.name, cls.index, dst.index),
                [template_group(self.bank, self.world, cls, alias, alias, cls.index, dst.index)
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
        name_groups = {c.index: [template_group(self.bank, self.world, c, n, n, c.index) for n in c.names]
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
                template_group(self.bank, self.world, cls, alias, alias, cls.index, cls.index),
                free_form_group(self.bank, cls, alias, alias, cls.index, cls.index),
                [template_group(self.bank, self.world, cls, n, f"{alias} / {n}", cls.index, cls.index)
                 for n in others],
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


def _editors(method: str, bundle: ModelBundle | None, config: IcebConfig) -> dict[str, Editor]:
    """One editor per subtask (the subtask is its task), every option checked now."""
    cls = editor_class(method)
    return {subtask: cls.create(bundle, task=subtask, **config.options, **config.editor_runtime(cls))
            for subtask in config.subtasks}


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
    the model). ``options`` go to the editor, over the subtask's presets; ``settings`` are
    :class:`IcebConfig` fields. Every option is checked before the model loads.
    ``results.json`` is rewritten after every scale (``"complete": false`` until the end), so
    a long sweep that stops keeps what it measured; its caches make a rerun cheap.
    Returns the results dictionary.
    """
    started = time.perf_counter()
    config = IcebConfig(scales=tuple(edits), subtasks=tuple(subtasks), seed=seed,
                        options=dict(options or {}), **settings)
    _editors(method, None, config)  # bad options fail here, before the model loads
    bundle = model if isinstance(model, ModelBundle) else load_model(
        model, device=device, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    editors = _editors(method, bundle, config)  # ... and options the model cannot take, here
    world = world_for(bundle, config.reference_dir)
    config.check_scales(len(config.select(world.classes)))
    judge_name = judge if isinstance(judge, str) else (
        default_judge_name(bundle) if judge is None else str(getattr(judge, "source", type(judge).__name__)))
    judge_obj = load_judge(bundle, judge, bundle.device)  # a given bundle's device wins
    base_fingerprint = bundle.fingerprint()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ResultsWriter(out, {
        "benchmark": "ICEB",
        "model": bundle.source,
        "family": bundle.family,
        "model_fingerprint": base_fingerprint,
        "world": world.name,
        "method": method,
        "judge": judge_name,
        "settings": {**asdict(config), "method_options": {
            s: split_runtime({**editor.flat_options(preset_options(editor.methods(), bundle, s)),
                              **editor.flat_options(config.options)})[0]
            for s, editor in editors.items()}},
        "hparams": {s: editor.hparams() for s, editor in editors.items()},
        "sampling": dict(bundle.sampling),
        "versions": versions(),
        "device": str(bundle.device),
        "dtype": str(bundle.dtype),
    })
    run = IcebRun(bundle, editors, judge_obj, world, config, out, writer)
    for subtask in config.subtasks:
        writer.subtask(subtask, getattr(run, subtask)())
        if bundle.fingerprint() != base_fingerprint:
            raise RuntimeError("the model was not restored after an ICEB edit")
    writer.results["timings"] = {**run.timings, "pre_images_s": run.scorer.pre_seconds,
                                 "total_s": time.perf_counter() - started}
    writer.results["images"] = {"unique_prompts": len(run.bank)}
    results = writer.merged()
    if report:
        from .report import write_report

        results["report"] = write_report(results, out, run.grid_images())
    results = writer.write(complete=True, merged=results)
    log.info("ICEB results written to %s", writer.path)
    return results
