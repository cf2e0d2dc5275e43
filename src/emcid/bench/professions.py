"""Gender debiasing over professions, measured as the TIME, UCE and EMCID papers measure it:
``emcid bench professions``.

Every profession X is debiased over attribute values (default "male", "female") by EMCID's
debias task (:func:`emcid.tasks.debias.debias`: a Stage I per value, mixing factors tuned by
generating and classifying, one Stage II for all). Its evaluation prompts ("a photo of a X",
or the file's) are drawn K times by the unedited and by the debiased model with the same
seeds, and a local CLIP classifies each image zero-shot into "a male X", "a female X". The
figures: each value's share before and after, and the distance from an even split (the
largest |share - 1/n|; for two values TIME's delta is twice it), per profession and on
average. The evaluation seeds (``seed`` .. ``seed + K - 1``) are not the tuning's (from
``seed + K`` on), so no figure is read off the images the factors were tuned on.

On the embedded world (no ``--model``) the analogue is the colour-word debias on
``embedded:tasks`` (as benchmarks/debias_mini.py): concepts the world always draws on one
named colour, balanced over that colour word and a second one, judged by the world's judge.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from ..core.bundle import ModelBundle
from ..core.config import check_float, check_int
from ..core.family import EMBEDDED_TASKS
from ..core.generation import MAX_SEED, generate_arrays, resolve_settings, to_pil
from ..core.loading import load_model
from ..core.outputs import check_output
from ..errors import BenchmarkError, RequestError
from ..requests.debias import DebiasRequest
from ..tasks.debias import Classifier, DebiasConfig, balance_gap, debias, debias_options, format_report
from .namelists import load_names
from .pair_judges import DEFAULT_CLIP, ClipPairJudge
from .results import versions, write_atomic

ATTRIBUTES = ("male", "female")
#: The evaluation prompt of a profession named without prompts, with its article ("an engineer").
PROFESSION_TEMPLATE = "a photo of {}"


@dataclass
class ProfessionsConfig:
    """How a run draws its evaluation images (every field goes to results.json)."""

    images: int = 8  # evaluation images per prompt, seeds seed + k
    seed: int = 0  # evaluation seeds; tuning seeds follow them; the world's concepts
    concepts: int | None = None  # the embedded world: how many concepts (default 10)
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("benchmark", "images", self.images)
        check_int("benchmark", "seed", self.seed, minimum=0)
        if self.concepts is not None:
            check_int("benchmark", "concepts", self.concepts)

    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.images)]


class ClipLabels:
    """Zero-shot classification by a local CLIP, debias's :data:`Classifier`: the softmax of
    CLIP's image-text logits over the labels. The CLIP is read as the pair judges read it
    (never downloaded; a missing one is one line naming it)."""

    def __init__(self, model_id: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        self.judge = ClipPairJudge(model_id, device)

    def describe(self) -> dict:
        return {**self.judge.describe(), "labels": "a <value> <profession>"}

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], labels: Sequence[str]) -> torch.Tensor:
        judge = self.judge
        tokens = judge.tokenizer(list(labels), padding=True, truncation=True, return_tensors="pt")
        tokens = tokens.to(judge.device)
        parts = [judge.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                             pixel_values=judge._pixels(images[i:i + judge.batch_size])
                             ).logits_per_image.float().softmax(-1).cpu()
                 for i in range(0, len(images), judge.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, len(labels))


def label_shares(scores: torch.Tensor) -> list[float]:
    """The share of images whose highest score is each label's (as debias counts them)."""
    counts = torch.bincount(scores.argmax(-1), minlength=scores.shape[1])
    return [int(c) / len(scores) for c in counts]


def attribute_shares(bundle: ModelBundle, classifier: Classifier, request: DebiasRequest,
                     prompts: Sequence[str], seeds: Sequence[int]) -> list[float]:
    """Each value's share of the images of ``prompts`` drawn with every seed."""
    drawn = [p for p in prompts for _ in seeds]
    images = to_pil(generate_arrays(bundle, drawn, list(seeds) * len(prompts), progress=False))
    return label_shares(torch.as_tensor(classifier(images, request.destinations())))


def measure(bundle: ModelBundle, patch, classifier: Classifier, requests: Sequence[DebiasRequest],
            prompts: Sequence[Sequence[str]], seeds: Sequence[int]) -> tuple[list, list]:
    """Every request's shares on its prompts and seeds, unedited and with ``patch`` applied
    (reverted after)."""
    def shares() -> list[list[float]]:
        return [attribute_shares(bundle, classifier, request, texts, seeds)
                for request, texts in zip(requests, prompts, strict=True)]

    before = shares()
    with patch.applied(bundle):
        return before, shares()


def gap_summary(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> dict:
    """Mean distance from an even split over the professions, before and after."""
    return {"mean_gap_before": sum(map(balance_gap, before)) / len(before),
            "mean_gap_after": sum(map(balance_gap, after)) / len(after)}


def _file_requests(path, attributes: Sequence[str], seed: int) -> tuple[list[DebiasRequest], list]:
    """The profession file's debias requests and evaluation prompts (a bad name names its line)."""
    requests, prompts = [], []
    for entry in load_names(path, "profession"):
        try:
            request = DebiasRequest(entry.name, tuple(attributes), seed=seed)
        except RequestError as exc:
            raise BenchmarkError(f"{path} line {entry.line}: {exc}") from exc
        requests.append(request)
        prompts.append(list(entry.prompts) or [PROFESSION_TEMPLATE.format(request.concept())])
    return requests, prompts


def _check(model, professions_file, attributes, clip, config: ProfessionsConfig,
           options: dict, out) -> tuple[bool, DebiasConfig, dict]:
    """Everything that can be checked before the model loads: returns whether the run is the
    embedded world's, the tuning settings and EMCID's options."""
    embedded = model is None or str(model).startswith("embedded")
    if "classifier" in options:
        raise BenchmarkError("the classifier is the run's judge: give it with --clip")
    _, tuning, editor_options = debias_options("emcid", options)
    check_float("benchmark", "tolerance", tuning.tolerance, 0, 1)
    last = config.seed + config.images + tuning.images - 1
    if last > MAX_SEED:
        raise BenchmarkError(f"seeds {config.seed}..{last} pass 2**63 - 1")
    if embedded:
        given = [flag for flag, value in (("--professions", professions_file), ("--clip", clip),
                                          ("--attributes", attributes)) if value is not None]
        if given:
            raise BenchmarkError(f"the embedded world debiases its own concepts over colour words: drop "
                                 f"{given[0]}, or give --model a Stable Diffusion model")
    else:
        if professions_file is None:
            raise BenchmarkError("give --professions (a CSV file with a profession column, or one a line)")
        if config.concepts is not None:
            raise BenchmarkError("--concepts counts the embedded world's concepts; the professions "
                                 "file sets what runs")
    check_output(out, [("model", model), ("professions", professions_file), ("clip", clip)], "folder")
    return embedded, tuning, editor_options


def run_professions(model: str | Path | None = None, professions_file: str | Path | None = None,
                    attributes: Sequence[str] | None = None, clip: str | None = None,
                    out: str | Path = "professions", options: dict | None = None, device: str = "cpu",
                    dtype: str = "float32", allow_pickle: bool = False, **settings: object) -> dict:
    """Debias every profession over ``attributes`` and measure the shares before and after;
    write ``out/results.json``.

    On Stable Diffusion (``model`` and ``professions_file`` given) images are classified by
    ``clip`` (a CLIP folder or cached hub id; default ``openai/clip-vit-large-patch14``).
    Without ``model``: the colour-word debias of ``concepts`` world concepts on
    ``embedded:tasks``. ``options`` are EMCID's and the tuning's (``images``, ``rounds``,
    ``tolerance`` in [0, 1] ...); ``settings`` :class:`ProfessionsConfig` fields. Everything
    is checked before any work.
    """
    started = time.perf_counter()
    config = ProfessionsConfig(**settings)
    options = dict(options or {})
    embedded, tuning, editor_options = _check(model, professions_file, attributes, clip, config,
                                              options, out)
    tuning_seed = config.seed + config.images
    if embedded:
        from .styles import colour_debias_requests

        requests = [replace(r, seed=tuning_seed)
                    for r in colour_debias_requests(config.concepts or 10, config.seed)]
        prompts = [[tuning.prompt.format(r.concept())] for r in requests]
    else:
        requests, prompts = _file_requests(professions_file, attributes or ATTRIBUTES, tuning_seed)
    judge = None if embedded else ClipLabels(clip or DEFAULT_CLIP, device)
    bundle = load_model(EMBEDDED_TASKS if model is None else model, device=device,
                        dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    if bundle.is_embedded != embedded:
        raise BenchmarkError(f"{bundle.source} is the embedded model: drop --model and --professions "
                             "for its colour-word analogue")
    if embedded:
        from ..tasks.debias import embedded_classifier

        classifier: Classifier = embedded_classifier(bundle, requests)
        described = {"kind": "mini", "id": "mini", "reads": "the background colour each value names"}
    else:
        classifier, described = judge, judge.describe()
    patch = debias(bundle, requests, classifier, tuning, progress=config.progress, **editor_options)
    seeds = config.seeds()
    before, after = measure(bundle, patch, classifier, requests, prompts, seeds)
    tuned = patch.metadata["debias"]
    records = [{"source": r.source, "values": list(r.values), "labels": r.destinations(), "prompts": p,
                "before": b, "after": a, "gap_before": balance_gap(b), "gap_after": balance_gap(a),
                **{key: t[key] for key in ("factors", "rounds", "tuned", "history")}}
               for r, p, b, a, t in zip(requests, prompts, before, after, tuned, strict=True)]
    sampling = resolve_settings(bundle)
    results = {
        "benchmark": "professions-world" if embedded else "professions", "model": bundle.source,
        "family": bundle.family, "model_fingerprint": bundle.fingerprint(), "method": "emcid",
        "options": options, "hparams": patch.metadata["hparams"],
        "professions_file": None if professions_file is None else str(professions_file),
        "attributes": None if embedded else list(attributes or ATTRIBUTES), "classifier": described,
        "settings": {**asdict(config), "seeds": seeds, "tuning": asdict(tuning),
                     "tuning_seeds": [tuning_seed, tuning_seed + tuning.images - 1], "sampling": sampling,
                     "image_size": [sampling["height"], sampling["width"]]},
        "professions": records, "summary": gap_summary(before, after), "versions": versions(),
        "device": str(bundle.device), "timings": {"total_s": time.perf_counter() - started}, "complete": True}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out) / "results.json", results)
    return results


def format_summary(results: dict) -> str:
    """Per profession the shares before and after, then the mean distances from even."""
    summary = results["summary"]
    return (f"{format_report(results['professions'])}\nmean distance from an even split: before "
            f"{summary['mean_gap_before']:.3f}, after {summary['mean_gap_after']:.3f}")
