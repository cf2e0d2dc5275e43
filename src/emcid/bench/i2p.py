"""Nudity erasure on I2P: ``emcid bench i2p``.

I2P (Schramowski et al., 2023, "Inappropriate Image Prompts") is a CSV of real user prompts
with their categories and the seed, guidance and size they were drawn with. The run edits the
model (e.g. erases "nudity"), draws the prompts of one category (default "sexual", 4,703
prompts) with the unedited and the edited model, one image per prompt with the row's seed
and guidance (the I2P protocol of the ESD and UCE scripts), and counts NudeNet's
nudity detections above a threshold on both sets (:mod:`emcid.bench.nudity`). Everything a
figure depends on goes to ``results.json``; the same command gives the same file, timings aside.
The embedded world has no nudity concept, so I2P has no analogue on it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from ..core.bundle import ModelBundle
from ..core.config import check_float, check_int
from ..core.generation import MAX_SEED, check_seeds, generate_arrays, resolve_settings, to_pil
from ..core.loading import load_model
from ..core.outputs import check_output
from ..editors.registry import get_editor
from ..errors import BenchmarkError
from ..requests.edit import EditRequest
from ..requests.files import load_requests
from ..tasks.edit import edit_patch
from .csvfile import read_rows
from .nudity import (
    DEFAULT_THRESHOLD,
    NUDITY_CLASSES,
    NudityDetector,
    check_classes,
    check_threshold,
    nudity_figures,
)
from .results import versions, write_atomic

DEFAULT_CATEGORY = "sexual"
#: Optional columns and the other names they have in copies of I2P (ESD's and UCE's CSVs).
OPTIONAL = {"categories": ("categories",), "seed": ("sd_seed", "evaluation_seed"),
            "guidance": ("sd_guidance_scale", "evaluation_guidance"), "width": ("sd_image_width",),
            "height": ("sd_image_height",), "nudity_percentage": ("nudity_percentage",)}
NO_ANALOGUE = ("the embedded world has no nudity concept, so I2P has no analogue on it: give --model "
               "a Stable Diffusion model")


@dataclass(frozen=True)
class I2PRow:
    """One prompt of the file; ``line`` is where its record starts. None: the cell (or column)
    is absent, and the run's default stands in."""

    line: int
    prompt: str
    categories: tuple[str, ...] = ()
    seed: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    nudity_percentage: float | None = None


def _records(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header (it must name ``prompt``) and each record with the line it starts on."""
    header, records = read_rows(path)
    if "prompt" not in header:
        raise BenchmarkError(f"{path}: no column 'prompt' (an I2P file has the columns prompt, "
                             "categories, sd_seed, sd_guidance_scale, sd_image_width, ...)")
    return header, records


def _number(text: str, kind: type, column: str, path: Path, line: int, low: float, high: float | None):
    """A cell as an int or a float inside [low, high]; "1234.0" is the int 1234 (pandas writes
    integer columns with gaps so)."""
    try:
        value = float(text)
        if kind is int:
            if not value.is_integer():
                raise ValueError
            value = int(text) if text.lstrip("+-").isdigit() else int(value)
    except (ValueError, OverflowError):
        value = None
    if value is None or not math.isfinite(value) or value < low or (high is not None and value > high):
        what = "an integer" if kind is int else "a number"
        span = f"{what} in [{low:g}, {'inf' if high is None else high}]"
        raise BenchmarkError(f"{path} line {line}: column {column!r} holds {text!r}; give {span}")
    return value


def _row(cells: dict, columns: dict[str, str], path: Path, line: int) -> I2PRow:
    """One record as a row; a bad cell names the file, the line and the column."""
    prompt = cells["prompt"]
    if not prompt:
        raise BenchmarkError(f"{path} line {line}: the cell of column 'prompt' is empty")
    limits = {"seed": (int, 0, MAX_SEED), "guidance": (float, 0, None), "width": (int, 8, None),
              "height": (int, 8, None), "nudity_percentage": (float, 0, 100)}
    values: dict = {}
    for field, (kind, low, high) in limits.items():
        column = columns.get(field)
        text = cells[column] if column else ""
        values[field] = _number(text, kind, column, path, line, low, high) if text else None
    categories = columns.get("categories")
    names = tuple(c.strip().lower() for c in cells[categories].split(",") if c.strip()) if categories else ()
    return I2PRow(line, prompt, names, **values)


def load_i2p(path: str | Path, category: str | None = DEFAULT_CATEGORY, limit: int | None = None,
             min_nudity: float | None = None) -> list[I2PRow]:
    """The rows of an I2P CSV file: those whose ``categories`` (comma-separated) include
    ``category`` (None: every row), whose ``nudity_percentage`` is at least ``min_nudity``
    (when given), the first ``limit`` of them. ``prompt`` is required; the optional columns
    (:data:`OPTIONAL`) are read where present. Errors name the file (and the line, column)."""
    path = Path(path)
    if limit is not None:
        check_int("benchmark", "images", limit)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such I2P file")
    header, records = _records(path)
    columns = {field: next((n for n in names if n in header), None) for field, names in OPTIONAL.items()}
    columns = {field: name for field, name in columns.items() if name}
    rows = [_row(cells, columns, path, line) for line, cells in records]
    if not rows:
        raise BenchmarkError(f"{path}: the file has a header but no rows")
    where = ""
    if category is not None:
        if "categories" not in columns:
            raise BenchmarkError(f"{path}: no column 'categories' to select the category {category!r} by; "
                                 "give --category all to keep every row")
        rows = [r for r in rows if category.lower() in r.categories]
        where = f" of category {category!r}"
    if min_nudity is not None:
        if "nudity_percentage" not in columns:
            raise BenchmarkError(f"{path}: no column 'nudity_percentage' to select rows by")
        rows = [r for r in rows if r.nudity_percentage is not None and r.nudity_percentage >= min_nudity]
        where += f" with nudity_percentage >= {min_nudity:g}"
    if not rows or (limit is not None and limit > len(rows)):
        asked = f"{limit} images asked for, but " if limit is not None else ""
        raise BenchmarkError(f"{path}: {asked}the file has {len(rows)} rows{where}")
    return rows[:limit]


@dataclass
class I2PConfig:
    """What a run draws and counts (every field goes to results.json)."""

    images: int | None = None  # the first N rows of the category, one image each (None: all)
    category: str | None = DEFAULT_CATEGORY  # None: every row
    threshold: float = DEFAULT_THRESHOLD  # a detection counts when its score is above it
    classes: tuple[str, ...] = NUDITY_CLASSES
    seed: int = 0  # row k without a seed of its own is drawn with seed + k
    sampling_steps: int | None = None  # None: the model's (I2P has no steps column)
    row_size: bool = False  # draw at each row's sd_image_width/height (the field: the model's size)
    min_nudity: float | None = None  # keep rows whose nudity_percentage is at least this
    grid: int = 4  # prompts shown in report.html's grid
    progress: bool = True

    def __post_init__(self) -> None:
        if self.images is not None:
            check_int("benchmark", "images", self.images)
        self.threshold = check_threshold(self.threshold)
        self.classes = check_classes(self.classes)
        check_int("benchmark", "seed", self.seed, minimum=0)
        if self.sampling_steps is not None:
            check_int("benchmark", "sampling_steps", self.sampling_steps)
        if self.min_nudity is not None:
            check_float("benchmark", "min_nudity", self.min_nudity, 0, 100)
        check_int("benchmark", "grid", self.grid, minimum=0)
        if self.images is not None and self.seed + self.images - 1 > MAX_SEED:
            raise BenchmarkError(f"seeds {self.seed}..{self.seed + self.images - 1} pass 2**63 - 1")


@dataclass(frozen=True)
class Plan:
    """How each image is drawn: its seed, guidance and size, resolved from its row."""

    seeds: list[int]
    guidance: list[float]
    sizes: list[tuple[int, int]]  # (height, width)
    steps: int


def plan_images(rows: Sequence[I2PRow], config: I2PConfig, sampling: dict) -> Plan:
    """Each row's seed (else ``seed + k``), guidance (else the model's) and size (the model's,
    or the row's with ``row_size``)."""
    seeds = [r.seed if r.seed is not None else config.seed + k for k, r in enumerate(rows)]
    check_seeds(seeds)
    guidance = [r.guidance if r.guidance is not None else float(sampling["guidance_scale"]) for r in rows]
    model_size = (sampling["height"], sampling["width"])
    sizes = [(r.height, r.width) if config.row_size and r.height and r.width else model_size for r in rows]
    return Plan(seeds, guidance, sizes, config.sampling_steps or sampling["num_inference_steps"])


def draw(bundle: ModelBundle, prompts: Sequence[str], plan: Plan, progress: bool = True) -> list[Image.Image]:
    """One image per prompt, batched by (guidance, size); an image depends only on its own
    prompt, seed and settings, so the grouping changes nothing."""
    groups: dict[tuple, list[int]] = {}
    for k, key in enumerate(zip(plan.guidance, plan.sizes)):
        groups.setdefault(key, []).append(k)
    images: list = [None] * len(prompts)
    for (guidance, (height, width)), ks in groups.items():
        arrays = generate_arrays(bundle, [prompts[k] for k in ks], [plan.seeds[k] for k in ks],
                                 progress=progress, num_inference_steps=plan.steps,
                                 guidance_scale=guidance, height=height, width=width)
        for k, image in zip(ks, to_pil(arrays), strict=True):
            images[k] = image
    return images


def _edit_requests(path: str | Path) -> list[EditRequest]:
    requests = list(load_requests(path))
    if not all(isinstance(r, EditRequest) for r in requests):
        raise BenchmarkError(f"{path} holds debias requests; bench i2p measures edit (erase) requests")
    return requests


def _check_sizes(rows: Sequence[I2PRow], path: str | Path, config: I2PConfig) -> None:
    """Sizes Stable Diffusion can draw (multiples of 8), checked before the model loads."""
    for row in rows if config.row_size else ():
        for name, value in (("sd_image_width", row.width), ("sd_image_height", row.height)):
            if value is not None and value % 8:
                raise BenchmarkError(f"{path} line {row.line}: column {name!r} holds {value}; Stable "
                                     "Diffusion draws multiples of 8 (or drop --row-size)")


def _row_record(row: I2PRow, plan: Plan, k: int, before: list[dict], after: list[dict]) -> dict:
    return {**asdict(row), "categories": list(row.categories), "drawn": {
        "seed": plan.seeds[k], "guidance": plan.guidance[k], "size": list(plan.sizes[k])},
            "detections": {"unedited": before, "edited": after}}


def _settings(config: I2PConfig, plan: Plan, sampling: dict) -> dict:
    """Every setting a figure depends on, as results.json records them."""
    given = {k: v for k, v in asdict(config).items() if k != "progress"}
    return {**given, "images": len(plan.seeds), "images_per_prompt": 1, "seeds": plan.seeds,
            "guidance": plan.guidance, "image_sizes": [list(s) for s in plan.sizes],
            "sampling_steps": plan.steps, "sampler": "DDIM", "sampling": sampling,
            "rule": "a detection counts when its class is in classes and its score > threshold; "
                    "an image shows nudity when one of its detections counts"}


def run_i2p(model: str | Path | ModelBundle, data: str | Path, requests_file: str | Path,
            method: str = "emcid", out: str | Path = "i2p", options: dict | None = None,
            device: str = "cpu", dtype: str = "float32", allow_pickle: bool = False,
            detector: NudityDetector | None = None, **settings: object) -> dict:
    """Edit ``model`` with the requests of ``requests_file``, draw the I2P prompts of ``data``
    with the unedited and the edited model, count NudeNet's nudity detections on both, and
    write ``out/results.json`` and ``out/report.html``. ``settings`` are :class:`I2PConfig`
    fields. Every setting, the output folder, the file and the options are checked before the
    model loads. Returns the results."""
    from .i2p_report import write_i2p_report

    started = time.perf_counter()
    config = I2PConfig(**settings)
    source = model.source if isinstance(model, ModelBundle) else model
    if source is None or str(source).startswith("embedded:"):
        raise BenchmarkError(NO_ANALOGUE)
    check_output(out, [("model", source), ("data", data), ("requests", requests_file)], "folder")
    rows = load_i2p(data, config.category, config.images, config.min_nudity)
    _check_sizes(rows, data, config)
    requests = _edit_requests(requests_file)
    options = dict(options or {})
    get_editor(method, None, **options)  # a bad option fails here, before any work
    detector = detector or NudityDetector()
    bundle = model if isinstance(model, ModelBundle) else load_model(
        model, device=device, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    if bundle.is_embedded:
        raise BenchmarkError(NO_ANALOGUE)
    sampling = resolve_settings(bundle)
    plan = plan_images(rows, config, sampling)
    prompts = [r.prompt for r in rows]
    editor = get_editor(method, bundle, **options)
    timings: dict = {}
    mark = time.perf_counter()
    patch = edit_patch(editor, bundle, requests, progress=config.progress)
    timings["edit_s"], mark = time.perf_counter() - mark, time.perf_counter()
    before = draw(bundle, prompts, plan, config.progress)
    with patch.applied(bundle):
        after = draw(bundle, prompts, plan, config.progress)
    timings["images_s"], mark = time.perf_counter() - mark, time.perf_counter()
    found = {"unedited": detector.detect(before), "edited": detector.detect(after)}
    timings["detect_s"] = time.perf_counter() - mark
    results = {
        "benchmark": "i2p", "model": bundle.source, "family": bundle.family,
        "model_fingerprint": bundle.fingerprint(), "method": method, "options": options,
        "hparams": editor.hparams(), "requests": [asdict(r) for r in requests], "data": str(data),
        "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(), "detector": detector.describe(),
        "settings": _settings(config, plan, sampling),
        **{name: nudity_figures(found[name], config.threshold, config.classes) for name in found},
        "rows": [_row_record(r, plan, k, found["unedited"][k], found["edited"][k])
                 for k, r in enumerate(rows)],
        "versions": versions(), "device": str(bundle.device), "dtype": str(bundle.dtype)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["report"] = write_i2p_report(results, out, before, after)
    results["timings"] = {**timings, "total_s": time.perf_counter() - started}
    results["complete"] = True
    write_atomic(out / "results.json", results)
    return results


def format_summary(results: dict) -> str:
    """The run's figures as a plain-text table, unedited beside edited."""
    settings, before, after = results["settings"], results["unedited"], results["edited"]
    lines = [f"i2p, {results['method']}: {settings['images']} prompts (category "
             f"{settings['category'] or 'any'}), NudeNet score > {settings['threshold']:g}",
             f"{'class':<26}{'unedited':>10}{'edited':>10}"]
    lines += [f"{name:<26}{before['detections'][name]:>10}{after['detections'][name]:>10}"
              for name in settings["classes"]]
    lines.append(f"{'total':<26}{before['total']:>10}{after['total']:>10}")
    lines.append(f"{'images with nudity':<26}{before['nude_fraction']:>10.3f}{after['nude_fraction']:>10.3f}")
    return "\n".join(lines)
