"""General quality after an edit: ``emcid bench coco``.

N captions (a seeded choice) are drawn by the unedited and by the edited model with the same
seeds (caption k: seed ``seed + k``). On Stable Diffusion the captions are the user's COCO
captions; FID compares the two image sets on a local CLIP's image embeddings and CLIP score
scores each set against its captions. On the embedded world the captions are held-out
free-form prompts of concepts the edit does not touch; FID runs on the world judge's features
and the judge's top-1 says whether each image still shows its concept. Everything a figure
depends on goes to ``results.json``; the same command gives the same file, timings aside.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.bundle import ModelBundle
from ..core.config import check_int
from ..core.corpus import read_corpus
from ..core.generation import MAX_SEED, generate_arrays, resolve_settings, to_pil
from ..core.loading import load_model
from ..core.outputs import check_output
from ..editors.registry import get_editor
from ..errors import BenchmarkError
from ..requests.edit import EditRequest
from ..requests.files import load_requests
from ..tasks.edit import edit_patch
from . import quality
from .pair_judges import DEFAULT_CLIP, ClipPairJudge
from .results import versions, write_atomic


@dataclass
class QualityConfig:
    """What a run draws (every field goes to results.json)."""

    captions: int = 100  # captions, one image each, per model
    edits: int = 10  # the embedded world without --requests: the first N ICEB AICE edits
    seed: int = 0  # caption choice, image seeds (seed + k), the world's edits
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("benchmark", "captions", self.captions, minimum=2)
        check_int("benchmark", "edits", self.edits)
        check_int("benchmark", "seed", self.seed, minimum=0)
        if self.seed + self.captions - 1 > MAX_SEED:
            raise BenchmarkError(f"seeds {self.seed}..{self.seed + self.captions - 1} pass 2**63 - 1")

    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.captions)]


def choose(captions: list, count: int, seed: int) -> list:
    """A seeded choice of ``count`` captions, in a seeded order."""
    if count > len(captions):
        raise BenchmarkError(f"{count} captions asked for, but only {len(captions)} are available")
    return random.Random(f"quality-captions-{seed}").sample(captions, count)


def world_edits(bundle: ModelBundle, count: int, seed: int) -> list[EditRequest]:
    """The first ``count`` AICE edits of ICEB on the embedded world (its split, order and
    nearest destinations for ``seed``, no drawability filter)."""
    from .selection import choose_destinations, class_embeddings, split_classes
    from .worlds import mini_world

    world = mini_world()
    pool, holdout = split_classes(world.classes, seed, 0.5)
    edited = pool[:count]
    destinations = choose_destinations(edited, holdout, class_embeddings(bundle, edited),
                                       class_embeddings(bundle, holdout), seed)
    names = {c.index: c.name for c in world.classes}
    return [EditRequest(c.name, names[destinations[c.index]], world.templates, seed=seed) for c in edited]


def world_captions(requests: list[EditRequest], count: int, seed: int) -> list[tuple[str, int]]:
    """(free-form prompt, concept index) of concepts no request names: sentences held out of
    the model's training, each showing one concept the judge can check."""
    from ..mini import world

    touched = {n.lower() for r in requests for n in (r.source, r.destination)}
    pool = [(prompt, c.index) for c in world.load_concepts() if not touched & {n.lower() for n in c.names}
            for prompt, _ in world.free_form_prompts(c)]
    return choose(pool, count, seed)


def _images(bundle: ModelBundle, prompts: list[str], config: QualityConfig) -> list:
    return to_pil(generate_arrays(bundle, prompts, config.seeds(), progress=config.progress))


class WorldScorer:
    """The embedded world's figures: the judge's top-1 per set, FID on its features."""

    def __init__(self, device):
        from ..mini.judge import JUDGE_SIZE, load_judge

        self.judge = load_judge(str(device))
        self.describe = {"judge": "mini", "fid_features": "mini judge, last block average-pooled (64)",
                         "image_size": JUDGE_SIZE}

    def score(self, images: list, truth: list[int]) -> dict:
        top = self.judge.predict_proba(images).argmax(1)
        return {"top1": float((top == torch.tensor(truth)).float().mean())}

    def features(self, images: list) -> torch.Tensor:
        return quality.judge_features(self.judge, images)


class ClipScorer:
    """Stable Diffusion's figures: CLIP score per set, FID on CLIP's image embeddings."""

    def __init__(self, model_id: str, device):
        self.judge = ClipPairJudge(model_id, device)
        self.describe = {"judge": self.judge.describe(),
                         "fid_features": f"CLIP image embeddings ({model_id})",
                         "image_size": self.judge.size}

    def score(self, images: list, captions: list[str]) -> dict:
        return {"clip_score": quality.clip_score(self.judge, images, captions)}

    def features(self, images: list) -> torch.Tensor:
        return quality.clip_image_features(self.judge, images)


def _check(model, captions_file, requests_file, out, judge, config: QualityConfig, method: str,
           options: dict) -> None:
    """Everything that can be checked before the model loads."""
    quality._torchmetrics()
    embedded = model is None or str(model).startswith("embedded")
    if embedded and captions_file is not None:
        raise BenchmarkError("the embedded world draws only its own captions: drop --captions, "
                             "or give --model a Stable Diffusion model")
    if not embedded and captions_file is None:
        raise BenchmarkError("give --captions (COCO's captions_val2017.json or another caption file)")
    if not embedded and requests_file is None:
        raise BenchmarkError("give --requests (the edit to measure) on a Stable Diffusion model")
    if embedded and judge not in (None, "mini"):
        raise BenchmarkError(f"the embedded world is judged by its own judge, not {judge!r}")
    check_output(out, [("model", model), ("captions", captions_file), ("requests", requests_file),
                       ("judge", judge)], "folder")
    get_editor(method, None, **options)


def _edit_requests(path: str | Path) -> list[EditRequest]:
    """The edit requests of a request file (a debias file is refused: it is no edit to measure)."""
    requests = list(load_requests(path))
    if not all(isinstance(r, EditRequest) for r in requests):
        raise BenchmarkError(f"{path} holds debias requests; bench coco measures edit requests")
    return requests


def run_coco(model: str | Path | None = None, captions_file: str | Path | None = None,
             requests_file: str | Path | None = None, method: str = "emcid", out: str | Path = "coco",
             judge: str | None = None, options: dict | None = None, device: str = "cpu",
             **settings: object) -> dict:
    """Measure general quality after an edit and write ``out/results.json``: on Stable
    Diffusion (``captions_file`` and ``requests_file`` given) FID on CLIP features and CLIP
    scores; on the embedded model FID on judge features and judge top-1, for ``requests_file``
    or the first ``edits`` ICEB AICE edits. ``settings`` are :class:`QualityConfig` fields.
    Every setting is checked before any work."""
    started = time.perf_counter()
    config = QualityConfig(**settings)
    options = dict(options or {})
    _check(model, captions_file, requests_file, out, judge, config, method, options)
    corpus = read_corpus(captions_file) if captions_file is not None else None
    chosen = choose(corpus, config.captions, config.seed) if corpus is not None else None
    requests = _edit_requests(requests_file) if requests_file is not None else None
    scorer = ClipScorer(judge or DEFAULT_CLIP, device) if corpus is not None else WorldScorer(device)
    bundle = load_model(model, device=device)
    if bundle.is_embedded == (corpus is not None):
        raise BenchmarkError(f"{bundle.source} is {'' if bundle.is_embedded else 'not '}the embedded model: "
                             f"{'drop' if bundle.is_embedded else 'give'} --captions")
    if corpus is None:
        if requests is None:
            requests = world_edits(bundle, config.edits, config.seed)
            options.setdefault("task", "aice")
        chosen = world_captions(requests, config.captions, config.seed)
    prompts = [c if isinstance(c, str) else c[0] for c in chosen]
    truth = prompts if corpus is not None else [c[1] for c in chosen]
    editor = get_editor(method, bundle, **options)
    patch = edit_patch(editor, bundle, requests, progress=config.progress)
    before = _images(bundle, prompts, config)
    with patch.applied(bundle):
        after = _images(bundle, prompts, config)
    sampling = resolve_settings(bundle)
    results = {
        "benchmark": "coco" if corpus is not None else "coco-world", "model": bundle.source,
        "model_fingerprint": bundle.fingerprint(), "method": method, "options": options,
        "hparams": editor.hparams(), "requests": [asdict(r) for r in requests],
        "captions_file": None if captions_file is None else str(captions_file),
        "metrics": scorer.describe,
        "settings": {**asdict(config), "seeds": config.seeds(), "sampling": sampling,
                     "image_size": [sampling["height"], sampling["width"]]},
        "captions": [list(c) if isinstance(c, tuple) else c for c in chosen],
        "unedited": scorer.score(before, truth), "edited": scorer.score(after, truth),
        "fid": quality.frechet_distance(scorer.features(before), scorer.features(after)),
        "versions": versions(), "device": str(bundle.device),
        "timings": {"total_s": time.perf_counter() - started}, "complete": True}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out) / "results.json", results)
    return results


def format_summary(results: dict) -> str:
    """The run's figures in a few lines."""
    rows = [f"{results['benchmark']}, {results['method']}: {len(results['requests'])} edits, "
            f"{results['settings']['captions']} captions",
            f"FID (unedited vs edited, {results['metrics']['fid_features']}): {results['fid']:.4g}"]
    for name, value in results["unedited"].items():
        rows.append(f"{name}: unedited {value:.3f}, edited {results['edited'][name]:.3f}")
    return "\n".join(rows)
