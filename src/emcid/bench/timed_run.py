"""The single-edit benchmark run: TIMED / RoAD rows, or their analogue on the embedded world.

Each row is edited alone, from the unedited model (a single edit), its probes' images are
drawn and judged, and the edit is reverted (bit exact) before the next row. Image ``k`` of
every prompt uses seed ``seed + k`` and sampling is DDIM, so the same command and settings
give the same figures. The unedited model's figures on the same prompts and seeds are
measured beside the edited ones. Everything a figure depends on goes to ``results.json``,
which is rewritten after every row (``"complete": false`` until the end).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.bundle import ModelBundle
from ..core.config import check_int
from ..core.family import EMBEDDED_TASKS
from ..core.generation import MAX_SEED, generate_arrays, resolve_settings, to_pil
from ..core.loading import load_model
from ..core.outputs import check_output
from ..editors.registry import get_editor
from ..errors import BenchmarkError
from ..tasks.edit import edit_patch
from .pair_judges import DEFAULT_CLIP, ClipPairJudge, PairJudge, WorldPairJudge
from .results import versions, write_atomic
from .timed import (
    DEFAULT_THRESHOLDS,
    LAYOUTS,
    TimedRow,
    check_thresholds,
    load_rows,
    mean_figures,
    row_figures,
)
from .timed_world import DEFAULT_ROWS, NEGATIVES, world_rows

log = logging.getLogger(__name__)

FIGURES = ("efficacy", "generality", "specificity")


@dataclass
class TimedConfig:
    """How a run draws and scores its images (every field goes to results.json)."""

    images: int = 4  # images per prompt (TIMED: 24 seeds, ReFACT: 25)
    seed: int = 0  # image k of every prompt uses seed + k; also the world's rows and the requests
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    unedited: bool = True  # also score the unedited model on the same prompts and seeds
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("benchmark", "images", self.images)
        check_int("benchmark", "seed", self.seed, minimum=0)
        if self.seed + self.images - 1 > MAX_SEED:
            raise BenchmarkError(f"seeds {self.seed}..{self.seed + self.images - 1} pass 2**63 - 1")
        self.thresholds = check_thresholds(self.thresholds)

    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.images)]


def judge_probes(bundle: ModelBundle, judge: PairJudge, row: TimedRow, config: TimedConfig) -> torch.Tensor:
    """The judge's P(destination) of each image of the row's probes, [probes, images]."""
    probes = row.probes()
    seeds = config.seeds()
    prompts = [p.prompt for p in probes for _ in seeds]
    images = to_pil(generate_arrays(bundle, prompts, seeds * len(probes), progress=False))
    pairs = [(p.source, p.destination) for p in probes for _ in seeds]
    return judge.destination_proba(images, pairs).view(len(probes), len(seeds))


def split_groups(row: TimedRow, proba: torch.Tensor) -> dict[str, torch.Tensor]:
    """``proba`` rows cut into the row's efficacy, positive and negative probes."""
    sizes = (len(row.efficacy), len(row.positives), len(row.negatives))
    return dict(zip(("efficacy", "positives", "negatives"), proba.split(sizes), strict=True))


def edited_proba(bundle: ModelBundle, editor, judge: PairJudge, row: TimedRow,
                 config: TimedConfig) -> tuple[torch.Tensor, float]:
    """The row's probabilities with its edit applied alone; the model is restored after."""
    started = time.perf_counter()
    patch = edit_patch(editor, bundle, [row.request], progress=config.progress)
    seconds = time.perf_counter() - started
    with patch.applied(bundle):
        return judge_probes(bundle, judge, row, config), seconds


def describe_row(row: TimedRow) -> dict:
    request = row.request
    return {"line": row.line, "source": request.source, "destination": request.destination,
            "prompts": list(request.prompts),
            "probes": {name: [asdict(p) for p in getattr(row, name)]
                       for name in ("efficacy", "positives", "negatives")}}


def scored_row(row: TimedRow, config: TimedConfig, edited: torch.Tensor,
               unedited: torch.Tensor | None) -> dict:
    """A row's record: what it edits, its figures edited and unedited, and the judge's
    P(destination) of every image they come from."""
    record = {**describe_row(row), "edited": None, "unedited": None, "p_destination": {}}
    for name, proba in (("edited", edited), ("unedited", unedited)):
        if proba is not None:
            groups = split_groups(row, proba)
            record[name] = row_figures(*groups.values(), config.thresholds)
            record["p_destination"][name] = {k: v.tolist() for k, v in groups.items()}
    return record


def summary(rows: Sequence[dict]) -> dict:
    """Mean figures over the rows so far, edited and (where measured) unedited."""
    return {name: mean_figures([r[name] for r in rows]) for name in ("unedited", "edited")
            if rows and rows[0][name] is not None}


def run_rows(bundle: ModelBundle, rows: Sequence[TimedRow], editor, judge: PairJudge,
             config: TimedConfig, results: dict, path: Path) -> dict:
    """Score every row (unedited, then edited alone), rewriting ``path`` after each row."""
    results = {**results, "rows": [], "timings": {"edit_s": []}}
    base = bundle.fingerprint()
    for row in tqdm(rows, desc="single edits", unit="edit", disable=not config.progress):
        unedited = judge_probes(bundle, judge, row, config) if config.unedited else None
        edited, edit_s = edited_proba(bundle, editor, judge, row, config)
        if bundle.fingerprint() != base:
            raise RuntimeError("the model was not restored after a single edit")
        results["rows"].append(scored_row(row, config, edited, unedited))
        results["timings"]["edit_s"].append(edit_s)
        results["summary"] = summary(results["rows"])
        write_atomic(path, {**results, "complete": False})
        log.info("line %d %s -> %s: %s", row.line, row.request.source, row.request.destination,
                 ", ".join(f"{k}={results['rows'][-1]['edited'][k]:.3f}" for k in FIGURES))
    return results


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rows_and_judge(data: str | Path | None, layout: str, judge: PairJudge | str | None,
                    config: TimedConfig, world_size: int, device) -> tuple[list[TimedRow], PairJudge, dict]:
    """The rows (from ``data``, or built from the embedded world), their judge and how they
    were made, all before the model loads."""
    if data is None:
        if layout != "timed":
            raise BenchmarkError(f"{layout}: give a data file; the embedded world's analogue is TIMED's")
        if isinstance(judge, str) and judge != "mini":
            raise BenchmarkError(f"the embedded world is judged by its own judge, not {judge!r}")
        rows = world_rows(world_size, config.seed, NEGATIVES)
        made = {"benchmark": "TIMED-world", "data": None,
                "world": {"rows": world_size, "negatives": NEGATIVES}}
        given = judge is not None and not isinstance(judge, str)
        return rows, judge if given else WorldPairJudge(device), made
    rows = load_rows(data, layout, config.seed)
    made = {"benchmark": LAYOUTS[layout].name, "data": str(data),
            "data_sha256": _file_sha256(data)}
    if judge is None or isinstance(judge, str):
        judge = ClipPairJudge(judge or DEFAULT_CLIP, device)
    return rows, judge, made


def _load(model: str | Path | ModelBundle | None, world: bool, device: str, dtype: str,
          allow_pickle: bool) -> ModelBundle:
    """The model, checked against the rows: world rows need the embedded model that draws
    colour words, CSV rows a model other than the embedded one."""
    bundle = model if isinstance(model, ModelBundle) else load_model(
        EMBEDDED_TASKS if model is None else model, device=device, dtype=getattr(torch, dtype),
        allow_pickle=allow_pickle)
    if world and "colour_words" not in bundle.settings.get("tasks", ()):
        raise BenchmarkError(f"the embedded world's rows need a model that draws colour words: "
                             f"--model {EMBEDDED_TASKS} (docs/mini.md)")
    if not world and bundle.is_embedded:
        raise BenchmarkError("the embedded model draws only its own world; run TIMED and RoAD files "
                             "on a Stable Diffusion model, or drop --data for the world's rows")
    return bundle


def run_timed(model: str | Path | ModelBundle | None = None, data: str | Path | None = None,
              layout: str = "timed", method: str = "emcid", out: str | Path = "timed",
              judge: PairJudge | str | None = None, options: dict | None = None,
              world_size: int = DEFAULT_ROWS, device: str = "cpu", dtype: str = "float32",
              allow_pickle: bool = False, **settings: object) -> dict:
    """Run TIMED (``layout="timed"``) or RoAD (``"road"``) on ``data``, or, without ``data``,
    TIMED's analogue on the embedded world (``world_size`` seeded rows on ``embedded:tasks``),
    and write ``out/results.json``. ``settings`` are :class:`TimedConfig` fields; ``judge`` a
    pair judge, a CLIP folder or cached hub id (default ``openai/clip-vit-large-patch14``),
    or "mini". Settings, the output folder, the options, the rows and the judge are checked
    before the model loads. Returns the results."""
    started = time.perf_counter()
    config = TimedConfig(**settings)
    if layout not in LAYOUTS:
        raise BenchmarkError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if model is None and data is not None:
        raise BenchmarkError(f"{LAYOUTS[layout].name} rows are prompts of the real world: give --model "
                             "(a Stable Diffusion model); without --data the embedded world's rows run")
    source = model.source if isinstance(model, ModelBundle) else model
    check_output(out, [("model", source), ("data", data),
                       ("judge", judge if isinstance(judge, str) else None)], "folder")
    options = dict(options or {})
    get_editor(method, None, **options)  # a bad option fails here, before any work
    device = model.device if isinstance(model, ModelBundle) else device
    rows, judge, made = _rows_and_judge(data, layout, judge, config, world_size, device)
    bundle = _load(model, data is None, device, dtype, allow_pickle)
    editor = get_editor(method, bundle, **options)
    sampling = resolve_settings(bundle)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = {
        **made, "model": bundle.source, "family": bundle.family, "model_fingerprint": bundle.fingerprint(),
        "method": method, "options": options, "hparams": editor.hparams(), "judge": judge.describe(),
        "settings": {**asdict(config), "seeds": config.seeds(), "sampling": sampling,
                     "image_size": [sampling["height"], sampling["width"]]},
        "versions": versions(), "device": str(bundle.device), "dtype": str(bundle.dtype)}
    results = run_rows(bundle, rows, editor, judge, config, header, out / "results.json")
    results["timings"]["total_s"] = time.perf_counter() - started
    results["complete"] = True
    write_atomic(out / "results.json", results)
    return results


def format_summary(results: dict) -> str:
    """The run's mean figures as a plain-text table."""
    thresholds = results["settings"]["thresholds"]
    head = [*FIGURES, *(f"generality>{t:g}" for t in thresholds)]
    lines = [f"{results['benchmark']}, {results['method']}: {len(results['rows'])} single edits, "
             f"{results['settings']['images']} images per prompt",
             "  ".join(f"{h:>16}" for h in ["", *head])]
    for name, figures in results["summary"].items():
        values = [figures[k] for k in FIGURES] + [figures["generality_at"][str(t)] for t in thresholds]
        lines.append("  ".join([f"{name:>16}"] + [f"{v:>16.3f}" for v in values]))
    return "\n".join(lines)
