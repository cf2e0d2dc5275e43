"""Artist erasure, measured as the EMCID and UCE papers measure it: ``emcid bench artists``.

An artist list is split into the erased artists (the first N, or the names given) and the
held ones (the rest). The erased are erased together, with the artist task's presets,
towards the model's generic concept; every artist's prompts are drawn by the unedited and by
the edited model with the same seeds (image k of a prompt: seed ``seed + k``). The figures:
LPIPS between each image before and after the edit, which should be high on erased artists
(their style is gone) and low on held ones (theirs is kept), and, where a CLIP is given, the
CLIP score of each group's images against their prompts before and after.

On the embedded world (no ``--model``) the run is the style-erasure benchmark
(:func:`emcid.bench.styles.run_style_sweep`: world concept names as styles), with its image
distance, LPIPS's analogue on the world judge or LPIPS where it runs offline. Everything a
figure depends on, the metric setting included, goes to ``results.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.bundle import ModelBundle
from ..core.config import check_int
from ..core.family import EMBEDDED_TASKS
from ..core.generation import MAX_SEED, generate_arrays, resolve_settings, to_pil
from ..core.loading import load_model
from ..core.outputs import check_output
from ..editors.registry import get_editor
from ..errors import BenchmarkError
from ..tasks.edit import edit_patch
from . import quality
from .namelists import NamedPrompts, load_names
from .pair_judges import ClipPairJudge
from .results import versions, write_atomic
from .styles import erase_requests, format_table

#: The prompt of an artist named without prompts (a plain text file), as in UCE's evaluation.
ARTIST_TEMPLATE = "a painting in the style of {}"
DISTANCES = ("lpips", "judge")
Distance = Callable[[Sequence, Sequence], torch.Tensor]


@dataclass
class ArtistsConfig:
    """How a run draws its images (every field goes to results.json)."""

    images: int | None = None  # images per prompt on Stable Diffusion (default 4); the world draws one
    seed: int = 0  # image k of a prompt uses seed + k; the world's split and probes
    held: int | None = None  # at most this many held artists (the world: held styles and objects, 100)
    singles: int = 8  # the world at --erase 1: the mean of this many styles, each erased alone
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("images", "held"):
            if getattr(self, name) is not None:
                check_int("benchmark", name, getattr(self, name))
        check_int("benchmark", "seed", self.seed, minimum=0)
        check_int("benchmark", "singles", self.singles)
        if self.seed + (self.images or 1) - 1 > MAX_SEED:
            raise BenchmarkError(f"seeds {self.seed}..{self.seed + (self.images or 1) - 1} pass 2**63 - 1")

    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.images or 4)]


def distance_setting(name: str, image_size: Sequence[int]) -> dict:
    """What the image distance ``name`` compares, for results.json."""
    from ..mini.judge import JUDGE_SIZE

    if name == "lpips":
        return {"name": "lpips", "network": "alex", "weights": quality.ALEXNET_WEIGHTS,
                "image_size": list(image_size), "input": "RGB scaled to [-1, 1]"}
    return {"name": "judge", "network": "the world judge's three conv blocks, unit-normalised channels "
                                        "(LPIPS's unweighted form)", "image_size": [JUDGE_SIZE, JUDGE_SIZE]}


def split_artists(artists: Sequence[NamedPrompts], erase: int | None, erase_list: Sequence[str] | None,
                  held: int | None, path: str | Path) -> tuple[list[NamedPrompts], list[NamedPrompts]]:
    """The erased artists (the first ``erase``, or those named, matched case-insensitively)
    and the held ones (the others in file order, at most ``held``)."""
    if (erase is None) == (erase_list is None):
        raise BenchmarkError("give the artists to erase: --erase N (the first N) or --erase-list NAME ...")
    if erase_list is not None:
        by_name = {a.name.casefold(): a for a in artists}
        keys = list(dict.fromkeys(n.strip().casefold() for n in erase_list))
        if not keys:
            raise BenchmarkError("--erase-list names no artist")
        unknown = [n for n in erase_list if n.strip().casefold() not in by_name]
        if unknown:
            raise BenchmarkError(f"{path} has no artist {unknown[0]!r}")
        erased = [by_name[k] for k in keys]
    else:
        if not 1 <= erase <= len(artists):
            raise BenchmarkError(f"--erase {erase}: {path} lists {len(artists)} artists")
        erased = list(artists[:erase])
    rest = [a for a in artists if a not in erased]
    return erased, rest[:held] if held is not None else rest


def artist_prompts(artist: NamedPrompts) -> tuple[str, ...]:
    """The file's prompts of an artist, or :data:`ARTIST_TEMPLATE` with its name."""
    return artist.prompts or (ARTIST_TEMPLATE.format(artist.name),)


def draw(bundle: ModelBundle, artists: Sequence[NamedPrompts], seeds: Sequence[int],
         progress: bool) -> list[list]:
    """Each artist's images: every prompt with every seed, prompt by prompt."""
    prompts = [p for a in artists for p in artist_prompts(a) for _ in seeds]
    images = iter(to_pil(generate_arrays(bundle, prompts, list(seeds) * (len(prompts) // len(seeds)),
                                         progress=progress)))
    return [[next(images) for _ in range(len(artist_prompts(a)) * len(seeds))] for a in artists]


def pooled_mean(values: Sequence[torch.Tensor]) -> float | None:
    """The mean over every image of a group of artists (None for an empty group)."""
    return float(torch.cat(list(values)).double().mean()) if values else None


def distance_summary(distances: Sequence[torch.Tensor], erased: Sequence[bool]) -> dict:
    """Mean image distance before vs after over the erased and over the held artists' images."""
    return {"erased_distance": pooled_mean([d for d, e in zip(distances, erased, strict=True) if e]),
            "held_distance": pooled_mean([d for d, e in zip(distances, erased, strict=True) if not e])}


def clip_summary(judge: ClipPairJudge, images: tuple[list, list], captions: list[list[str]],
                 erased: Sequence[bool]) -> dict:
    """CLIP score of the erased and of the held artists' images against their prompts, before
    and after the edit (torchmetrics' score, each group's images pooled)."""
    figures = {}
    for group, wanted in (("erased", True), ("held", False)):
        rows = [i for i, e in enumerate(erased) if e == wanted]
        for side, drawn in zip(("before", "after"), images, strict=True):
            pooled = [image for i in rows for image in drawn[i]]
            texts = [text for i in rows for text in captions[i]]
            figures[f"{group}_clip_{side}"] = quality.clip_score(judge, pooled, texts) if rows else None
    return figures


def _check(model, artists_file, erase_list, clip, distance: str | None, config: ArtistsConfig,
           options: dict, method: str, out) -> str:
    """Everything that can be checked before the model loads; returns the image distance (by
    default "judge" on the embedded world, "lpips" on Stable Diffusion)."""
    embedded = model is None or str(model).startswith("embedded")
    distance = distance or ("judge" if embedded else "lpips")
    if distance not in DISTANCES:
        raise BenchmarkError(f"unknown image distance {distance!r}; choose from {', '.join(DISTANCES)}")
    if embedded:
        given = [flag for flag, value in (("--artists", artists_file), ("--erase-list", erase_list),
                                          ("--clip", clip), ("--images", config.images)) if value is not None]
        if given:
            raise BenchmarkError(f"the embedded world erases its own styles (the first --erase N), drawn "
                                 f"once per prompt: drop {given[0]}, or give --model a Stable Diffusion "
                                 "model")
        if "task" in options:
            raise BenchmarkError("the style benchmark erases with the artist task's presets: drop task=")
    elif artists_file is None:
        raise BenchmarkError("give --artists (a CSV file with an artist column, or one name a line)")
    elif distance != "lpips":
        raise BenchmarkError("on Stable Diffusion the image distance is LPIPS (the judge's analogue "
                             "is the embedded world's)")
    elif clip is not None:
        quality._torchmetrics()  # CLIP score is torchmetrics': a missing one fails before any work
    check_output(out, [("model", model), ("artists", artists_file), ("clip", clip)], "folder")
    get_editor(method, None, **{"task": "artist", **options})
    return distance


def run_artists(model: str | Path | None = None, artists_file: str | Path | None = None,
                erase: int | None = None, erase_list: Sequence[str] | None = None, method: str = "emcid",
                out: str | Path = "artists", clip: str | None = None, distance: str | None = None,
                options: dict | None = None, device: str = "cpu", dtype: str = "float32",
                allow_pickle: bool = False, **settings: object) -> dict:
    """Erase artists and measure the images before vs after; write ``out/results.json``.

    On Stable Diffusion (``model`` and ``artists_file`` given): LPIPS per artist and, with
    ``clip`` (a CLIP folder or cached hub id), CLIP scores. Without ``model``: the style
    benchmark on ``embedded:tasks`` with ``distance`` "judge" (default) or "lpips".
    ``settings`` are :class:`ArtistsConfig` fields; everything is checked before any work.
    """
    started = time.perf_counter()
    config = ArtistsConfig(**settings)
    options = dict(options or {})
    distance = _check(model, artists_file, erase_list, clip, distance, config, options, method, out)
    if model is None or str(model).startswith("embedded"):
        results = _run_world(model, erase, method, config, distance, options, device)
    else:
        results = _run_model(model, artists_file, erase, erase_list, method, config, clip, options,
                             device, dtype, allow_pickle)
    results.update({"versions": versions(), "timings": {"total_s": time.perf_counter() - started},
                    "complete": True})
    Path(out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out) / "results.json", results)
    return results


def _run_model(model, artists_file, erase, erase_list, method: str, config: ArtistsConfig, clip,
               options: dict, device: str, dtype: str, allow_pickle: bool) -> dict:
    """The Stable Diffusion run: erase, draw before and after, LPIPS and CLIP score."""
    artists = load_names(artists_file, "artist")
    erased, held = split_artists(artists, erase, erase_list, config.held, artists_file)
    requests = erase_requests([a.name for a in erased])
    lpips = quality.lpips_model()
    judge = ClipPairJudge(clip, device) if clip is not None else None
    bundle = load_model(model, device=device, dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
    if bundle.is_embedded:
        raise BenchmarkError(f"{bundle.source} is the embedded model: drop --artists and --model for "
                             "its style benchmark")
    options = {"task": "artist", **options}
    editor = get_editor(method, bundle, **options)
    patch = edit_patch(editor, bundle, requests, progress=config.progress)
    watched, seeds = erased + held, config.seeds()
    before = draw(bundle, watched, seeds, config.progress)
    with patch.applied(bundle):
        after = draw(bundle, watched, seeds, config.progress)
    flags = [a in erased for a in watched]
    distances = [quality.lpips_distance(lpips, b, a) for b, a in zip(before, after, strict=True)]
    captions = [[p for p in artist_prompts(a) for _ in seeds] for a in watched]
    records = [{"artist": a.name, "line": a.line, "erased": flag, "prompts": list(artist_prompts(a)),
                "distance": float(d.double().mean()), "distances": d.tolist()}
               for a, flag, d in zip(watched, flags, distances, strict=True)]
    if judge is not None:
        for record, b, a, texts in zip(records, before, after, captions, strict=True):
            record["clip_score"] = {"before": quality.clip_score(judge, b, texts),
                                    "after": quality.clip_score(judge, a, texts)}
    summary = distance_summary(distances, flags)
    if judge is not None:
        summary.update(clip_summary(judge, (before, after), captions, flags))
    sampling = resolve_settings(bundle)
    size = [sampling["height"], sampling["width"]]
    return {
        "benchmark": "artists", "model": bundle.source, "family": bundle.family,
        "model_fingerprint": bundle.fingerprint(), "method": method, "options": options,
        "hparams": editor.hparams(), "artists_file": str(artists_file),
        "erased": [a.name for a in erased], "held": [a.name for a in held],
        "requests": [asdict(r) for r in requests],
        "metrics": {"distance": distance_setting("lpips", size),
                    "clip": judge.describe() if judge is not None else None},
        "settings": {**asdict(config), "images": len(seeds), "seeds": seeds, "sampling": sampling,
                     "image_size": size},
        "artists": records, "summary": summary, "device": str(bundle.device), "dtype": str(bundle.dtype)}


def _run_world(model, erase: int | None, method: str, config: ArtistsConfig, distance: str,
               options: dict, device: str) -> dict:
    """The embedded world's run: the style benchmark at one scale, ``erase`` styles."""
    from ..mini import styles
    from ..mini.judge import load_judge
    from .styles import OBJECTS_PER_STYLE, run_style_sweep, style_probe, style_split

    if erase is None:
        raise BenchmarkError("give --erase N: the embedded world erases its first N styles")
    if distance == "lpips":
        quality.lpips_model()  # fails here, before any work, where LPIPS cannot run offline
    held = 100 if config.held is None else config.held
    split = style_split(config.seed, held, held)
    if not 1 <= erase <= len(split.artists):
        raise BenchmarkError(f"--erase {erase}: the embedded world has {len(split.artists)} styles")
    bundle = load_model(model or EMBEDDED_TASKS, device=device)
    if "styles" not in bundle.settings.get("tasks", ()):
        raise BenchmarkError(f"{bundle.source} does not draw the world's styles: use --model "
                             f"{EMBEDDED_TASKS} (docs/mini.md)")
    figures = run_style_sweep(bundle, load_judge(str(bundle.device)), [erase], method, config.seed,
                              held, held, config.singles, config.progress, distance, **options)[erase]
    # at one style the figures are the mean of several single erasures (the sweep's "singles")
    erased = [s["style"] for s in figures["singles"]] if erase == 1 else split.artists[:erase]
    probes = [style_probe(name, config.seed) for name in dict.fromkeys(erased + split.held_styles)]
    sampling = resolve_settings(bundle)
    size = [sampling["height"], sampling["width"]]
    return {
        "benchmark": "artists-world", "model": bundle.source, "model_fingerprint": bundle.fingerprint(),
        "method": method, "options": options, "erased": erased, "held": split.held_styles,
        "metrics": {"distance": distance_setting(distance, size), "judge": "mini"},
        "settings": {**asdict(config), "erase": erase, "held_styles": held, "held_objects": held,
                     "prompts_per_style": len(styles.STYLE_PROMPTS) + OBJECTS_PER_STYLE,
                     "images_per_prompt": 1, "sampling": sampling, "image_size": size,
                     "probes": [{"style": p.style, "prompts": list(p.prompts), "seeds": list(p.seeds)}
                                for p in probes]},
        "summary": figures, "device": str(bundle.device)}


def format_summary(results: dict) -> str:
    """The run's figures in a few lines (the embedded world's: the style benchmark's table)."""
    head = (f"{results['benchmark']}, {results['method']}: {len(results['erased'])} artists erased, "
            f"image distance {results['metrics']['distance']['name']}")
    if results["benchmark"] == "artists-world":
        return f"{head}\n{format_table({results['settings']['erase']: results['summary']})}"
    return "\n".join([head] + [f"{key}: {'-' if value is None else format(value, '.4f')}"
                                for key, value in results["summary"].items()])
