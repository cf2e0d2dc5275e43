"""Debiasing (docs/method.md section 8): make a concept draw each value of an attribute equally often.

For a concept X ("doctor") and attribute values ("male", "female"), Stage I runs once per
value, towards "a male doctor" and "a female doctor", from the same source "a doctor". The
two deltas are mixed with factors that sum to one (``z = h + sum_i f_i delta_i``), and the
factors are tuned per concept: write the mixed target alone (Stage II), draw images of "an
image of a doctor", classify each image zero-shot into the values, and move every factor
against its value's excess share (``f_i <- max(f_i - step * (share_i - 1/n), 0)``,
renormalised). The release's budget and stop rule: 25 images per round, at most 10 rounds,
step 0.4, stop once every share is within 0.02 of ``1/n`` (with 25 images and two values that
is a 12/13 split). Then all concepts' mixed targets are written in one Stage II.

Two changes from the release: the step shrinks linearly over the rounds (so a share that
jumps across the balance point settles), and the factors kept are those of the best measured
round, not the update after the last one, so the reported share is one that was measured.
The "after" share in the patch metadata is measured again on the final, all-concept patch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from PIL import Image

from ..core.bundle import ModelBundle
from ..core.family import EMBEDDED_TASKS
from ..core.weights import deltas_applied
from ..editors.emcid.stage2 import compute_deltas
from ..editors.emcid.targets import ConceptTarget
from ..errors import ModelLoadError, OptionError, RequestError
from ..patch.format import EditPatch
from ..requests.debias import DebiasRequest, validate_debias_requests
from .edit import check_prompts, patch_metadata

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # release: the zero-shot judge of debiasing

# images, candidate labels -> (n_images, n_labels) scores (probabilities or logits): the
# share of a value is the fraction of images whose highest score is that value's.
Classifier = Callable[[list[Image.Image], Sequence[str]], torch.Tensor]
Measure = Callable[[list[float]], list[float]]  # mixing factors -> measured shares


@dataclass
class DebiasConfig:
    """Factor tuning; defaults are the release's (docs/method.md section 8)."""

    images: int = 25  # release: 25 images per round
    rounds: int = 10  # release: at most 10 rounds
    step: float = 0.4  # release: step 0.4 (here shrinking linearly to step / rounds)
    tolerance: float = 0.02  # release: stop when every share is within 0.02 of 1/n
    prompt: str = "an image of {}"  # release: the images classified are of "an image of X"

    def __post_init__(self) -> None:
        if self.images < 1 or self.rounds < 1 or self.step <= 0 or self.tolerance < 0:
            raise ValueError("debias needs images >= 1, rounds >= 1, step > 0 and tolerance >= 0")
        if self.prompt.count("{}") != 1:
            raise ValueError(f"the debias prompt {self.prompt!r} must contain '{{}}' exactly once")


def balance_gap(shares: Sequence[float]) -> float:
    """How far the most off-balance value is from an even share."""
    return max(abs(s - 1 / len(shares)) for s in shares)


def is_balanced(shares: Sequence[float], tolerance: float) -> bool:
    """The stop rule; the slack absorbs float error (12/25 - 1/2 is 0.020000000000000018)."""
    return balance_gap(shares) <= tolerance + 1e-9


def next_factors(factors: Sequence[float], shares: Sequence[float], step: float) -> list[float]:
    """Move each factor against its value's excess share, clipped at 0, renormalised."""
    moved = [max(f - step * (s - 1 / len(shares)), 0.0) for f, s in zip(factors, shares)]
    total = sum(moved)
    return [m / total for m in moved] if total > 0 else [1 / len(moved)] * len(moved)


@dataclass
class Tuning:
    """The chosen factors, the shares measured with them, and every round's record."""

    factors: list[float]
    shares: list[float]
    history: list[dict] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.history)


def tune_factors(measure: Measure, count: int, config: DebiasConfig) -> Tuning:
    """Tune mixing factors for ``count`` values; ``measure(factors)`` returns the shares.

    Starts even, stops as soon as the gap is within the tolerance, else after ``rounds``
    measurements; returns the best measured round (earliest on ties).
    """
    factors = [1 / count] * count
    best: Tuning | None = None
    history: list[dict] = []
    for index in range(config.rounds):
        shares = [float(s) for s in measure(factors)]
        history.append({"factors": factors, "shares": shares})
        log.info("debias round %d: factors %s, shares %s", index + 1, factors, shares)
        if best is None or balance_gap(shares) < balance_gap(best.shares):
            best = Tuning(factors, shares)
        if is_balanced(shares, config.tolerance):
            break
        factors = next_factors(factors, shares, config.step * (1 - index / config.rounds))
    best.history = history
    return best


class ClipZeroShot:
    """CLIP zero-shot classification of images into text labels (the release's judge)."""

    def __init__(self, model_id: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model_id)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the CLIP classifier {model_id!r}: {exc}") from exc
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], labels: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(labels), images=images, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.model(**inputs).logits_per_image.softmax(-1).cpu()


def value_shares(bundle: ModelBundle, classifier: Classifier, request: DebiasRequest,
                 config: DebiasConfig) -> list[float]:
    """Draw ``config.images`` images of "an image of X" (seeds from the request's) and return
    the fraction classified as each value."""
    from ..core.generation import generate_arrays, to_pil

    prompt = config.prompt.format(request.concept())
    seeds = [request.seed + i for i in range(config.images)]
    images = to_pil(generate_arrays(bundle, [prompt] * len(seeds), seeds, progress=False))
    scores = torch.as_tensor(classifier(images, request.destinations()))
    if scores.shape != (len(images), len(request.values)):
        raise ValueError(f"the classifier returned shape {tuple(scores.shape)}, expected "
                         f"({len(images)}, {len(request.values)})")
    counts = torch.bincount(scores.argmax(-1), minlength=len(request.values))
    return [int(c) / len(images) for c in counts]


def embedded_classifier(bundle: ModelBundle, requests: Sequence[DebiasRequest]) -> Classifier:
    """The embedded world's debias judge (background colour), after checking that the model
    draws attribute words and that every value is one of its colour words."""
    from ..mini import styles
    from ..mini.judge import ColourWordJudge, load_judge

    if "colour_words" not in bundle.settings.get("tasks", ()):
        raise RequestError(f"the embedded model draws no attribute words; debias on its world with "
                           f"--model {EMBEDDED_TASKS} (it draws colour words: \"a teal tench\"), "
                           "or give a Stable Diffusion model")
    for request in requests:
        unknown = [v for v in request.values if v.lower() not in styles.COLOUR_WORDS]
        if unknown:
            raise RequestError(f"the debias request for {request.source!r}: on the embedded world the "
                               f"values are colour words ({', '.join(sorted(styles.COLOUR_WORDS))}); "
                               f"{', '.join(map(repr, unknown))} is not one")
    return ColourWordJudge(load_judge(str(bundle.device)))


def mix(targets: Sequence[ConceptTarget], factors: Sequence[float]) -> ConceptTarget:
    """One Stage I target whose delta is the factor-weighted sum of the values' deltas (all
    share the source, so this is also the mix of their targets z)."""
    first = targets[0]
    deltas = {slot: sum(f * t.deltas[slot] for f, t in zip(factors, targets)) for slot in first.deltas}
    return replace(first, deltas=deltas)


def debias(bundle: ModelBundle, requests: Sequence[DebiasRequest], classifier: Classifier | None = None,
           config: DebiasConfig | None = None, progress: bool = True, **options) -> EditPatch:
    """Debias every request's concept and return one patch (not applied).

    ``classifier`` defaults to CLIP ViT-L/14 zero-shot (:class:`ClipZeroShot`); ``options``
    are EMCID's (``steps``, ``lam``, ``layers`` ...; ``stop_tolerance`` 0 unless given).
    The patch metadata's ``debias`` entry holds, per concept, the factors, the rounds used and
    the shares before and after.
    """
    from tqdm.auto import tqdm

    from ..editors.registry import get_editor

    requests = validate_debias_requests(list(requests))
    # The values' deltas are mixed by factors that sum to one, which compares them only when
    # each ran the same steps: Stage I's stopping rule (stop_tolerance) would end one value's
    # search early and tilt every mix, so debias runs every step unless told otherwise. It also
    # distils on the source's images alone (the release's): with the values' images beside them
    # each delta draws its value outright and a mix jumps from one value to the other
    # (embedded:tasks: mean distance from even 0.080 against 0.032, docs/mini.md).
    options = {"stop_tolerance": 0.0, "distil_on": "source", **options}
    stage1 = [r for request in requests for r in request.stage1_requests()]
    check_prompts(bundle, stage1)  # before the classifier loads
    if bundle.is_embedded:
        classifier = classifier or embedded_classifier(bundle, requests)
    editor = get_editor("emcid", bundle, **options)
    config = config or DebiasConfig()
    classifier = classifier or ClipZeroShot(device=bundle.device)
    base = bundle.fingerprint()
    layers = editor.layers_for(bundle)
    found = iter(editor.stage1_targets(bundle, stage1, layers, progress))
    moments = editor.second_moments(bundle, layers, progress)
    stage2 = editor.config.stage2

    def measure_with(request: DebiasRequest, targets: list[ConceptTarget]) -> Measure:
        def measure(factors: list[float]) -> list[float]:
            deltas = compute_deltas(bundle, [mix(targets, factors)], layers, moments, stage2,
                                    progress=False)
            with deltas_applied(bundle, deltas):
                return value_shares(bundle, classifier, request, config)
        return measure

    reports, mixed = [], []
    for request in tqdm(requests, desc="debias", unit="concept", disable=not progress):
        targets = [next(found) for _ in request.values]
        before = value_shares(bundle, classifier, request, config)
        tuning = tune_factors(measure_with(request, targets), len(request.values), config)
        mixed.append(mix(targets, tuning.factors))
        reports.append({"source": request.source, "values": list(request.values), "before": before,
                        "factors": tuning.factors, "tuned": tuning.shares, "rounds": tuning.rounds,
                        "history": tuning.history})
    deltas = compute_deltas(bundle, mixed, layers, moments, stage2, progress=progress)
    with deltas_applied(bundle, deltas):
        for request, report in zip(requests, reports):
            report["after"] = value_shares(bundle, classifier, request, config)
    hparams = {**editor.hparams(), "debias": asdict(config)}
    metadata = patch_metadata(bundle, editor.name, "debias", base, requests, hparams, debias=reports)
    return EditPatch.from_dense(deltas, metadata)


def debias_options(method: str, options: dict) -> tuple[Classifier | str | None, DebiasConfig, dict]:
    """Split ``emcid.edit``'s options for debias requests, checking them all (no model needed).

    Returns the classifier (a callable, a CLIP hub id or folder, or None for the release's
    CLIP), the tuning settings (:class:`DebiasConfig` fields: ``images``, ``rounds`` ...) and
    EMCID's own options (``steps``, ``lam``, ``layers`` ...).
    """
    from ..editors.registry import get_editor

    if method != "emcid":
        raise OptionError(f"debias requests are EMCID's task (method 'emcid'); {method!r} cannot "
                          "debias")
    editor_options = dict(options)
    classifier = editor_options.pop("classifier", None)
    tuning = {f.name: editor_options.pop(f.name) for f in fields(DebiasConfig) if f.name in editor_options}
    try:
        config = DebiasConfig(**tuning)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"debias tuning {tuning}: {exc}") from None
    get_editor("emcid", **editor_options)
    return classifier, config, editor_options


def edit_debias(bundle: ModelBundle, requests: Sequence[DebiasRequest], method: str = "emcid",
                progress: bool = True, **options) -> EditPatch:
    """:func:`debias` with ``emcid.edit``'s signature: ``options`` as :func:`debias_options` reads
    them; a classifier given as text is a CLIP model loaded for zero-shot judging."""
    classifier, config, editor_options = debias_options(method, options)
    if isinstance(classifier, (str, os.PathLike)):
        classifier = ClipZeroShot(os.fspath(classifier), bundle.device)
    return debias(bundle, requests, classifier, config, progress=progress, **editor_options)


def format_report(reports: Sequence[dict]) -> str:
    """The before/after shares per concept as a plain-text table."""
    def shares(report: dict, key: str) -> str:
        return " / ".join(f"{s:.2f}" for s in report[key])

    rows = [("concept", "values", "before", "after", "factors", "rounds")]
    rows += [(r["source"], " / ".join(r["values"]), shares(r, "before"), shares(r, "after"),
              shares(r, "factors"), str(r["rounds"])) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
