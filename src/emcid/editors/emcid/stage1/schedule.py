"""Which Stage I concepts run when: each concept cached under its full content key, unfinished
ones saving their progress and resuming from it, batches sized to the device's memory
(:func:`fitting_batch`, a probe step) and halved on an out-of-memory error. Results do not
depend on the batching (:mod:`.objective`), so none of this changes them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
from diffusers.training_utils import free_memory

from ....core.bundle import ModelBundle
from ....core.cache import TensorCache, content_key
from ....core.config import Runtime
from ....core.generation import resolve_settings
from ....errors import Stage1OutOfMemoryError
from ....requests.edit import EditRequest
from ..config import Precision, Stage1Config, resolve_precision
from ..targets import ConceptTarget
from .engine import TimingHook
from .latents import draw_images
from .objective import compute_z
from .report import log_cost, log_unconverged

log = logging.getLogger(__name__)

# What Stage I computes from given options and inputs. Raise it with any change to the code
# that moves a target for the same options and inputs, so that no cached target of older code
# is taken for a new one; the revision every key was made under before it existed, 1, stays out
# of keys, so those entries stay valid.
STAGE1_REVISION = 1
# Stage I options added after keys were first made, with the value every earlier key had.
BEFORE_OPTIONS = {"init": "zero", "conditioning": "pipeline", "latents": "mean", "stop_tolerance": 0.0,
                  "min_timestep": 0, "lr_schedule": "constant", "distil_on": "source"}
# Options that only matter where another is set: left out of a key where it is not.
MATTERS_ONLY_WITH = {"stop_window": "stop_tolerance", "min_steps": "stop_tolerance"}


def cache_key_for(bundle_fingerprint: str, request: EditRequest, z_layer: dict[str, int],
                  config: Stage1Config, image_settings: dict, device: torch.device,
                  precision: Precision = "auto") -> str:
    """Everything a Stage I result depends on: model, request (prompts, seed, images), config,
    and the precision where it is not fp32 (so fp32 keys are the same on every device)."""
    images = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in request.reference_images]
    hyper = asdict(config)
    for name, before in BEFORE_OPTIONS.items():
        if hyper[name] == before:
            del hyper[name]  # as every key made before the option had it
    for name, switch in MATTERS_ONLY_WITH.items():
        if switch not in hyper:
            del hyper[name]
    precision = resolve_precision(precision, device)
    if precision != "fp32":
        hyper["precision"] = precision
    if STAGE1_REVISION != 1:
        hyper["revision"] = STAGE1_REVISION
    return content_key(model=bundle_fingerprint, request=request.to_dict(), images=images,
                       z_layer=z_layer, config=hyper, image_settings=image_settings)


def fitting_batch(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
                  config: Stage1Config, image_cache: TensorCache, runtime: Runtime) -> int:
    """Concepts per batch that fit in the free memory of a CUDA device, measured by one probe
    step at one and at two concepts (the difference is one concept's cost); at most
    ``runtime.concept_batch`` where it is set. Elsewhere ``runtime.concept_batch``, or
    ``runtime.cpu_concept_batch`` where that is not set."""
    cuda = bundle.device.type == "cuda"
    cap = runtime.concept_batch or (len(requests) if cuda else runtime.cpu_concept_batch)
    limit = min(cap, len(requests))
    if not cuda or limit < 2:
        return limit
    device, probe = bundle.device, replace(config, steps=1)
    peaks = []
    for size in (1, 2):
        free_memory()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            compute_z(bundle, requests[:size], z_layer, probe, image_cache, runtime)
        except torch.OutOfMemoryError:
            return 1  # the batch loop reports it if even one concept does not fit
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_concept = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_concept, 0)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fit = int((0.9 * free - fixed) // per_concept)
    log.info("Stage I: %.2f GiB per concept, %.1f GiB free: %d concepts per batch",
             per_concept / 2**30, free / 2**30, fit)
    return max(1, min(limit, fit))


def _by_progress(missing: list[int], saved: dict[int, dict]) -> list[list[int]]:
    """Concepts grouped by the step their saved progress reached (fresh ones at step 0), so
    every batch resumes from one step."""
    groups: dict[int, list[int]] = {}
    for index in missing:
        groups.setdefault(int(saved[index]["step"]) if index in saved else 0, []).append(index)
    return list(groups.values())


def compute_targets(
    bundle: ModelBundle,
    requests: list[EditRequest],
    z_layer: dict[str, int],
    config: Stage1Config,
    cache: TensorCache | None = None,
    image_cache: TensorCache | None = None,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> list[ConceptTarget]:
    """Stage I for every request, each independent and cached under its full content key.

    Unfinished concepts save their progress every ``runtime.checkpoint_every`` steps and resume
    from it; a CUDA out-of-memory error halves the batch and goes on (finished concepts are
    already in the cache, and results do not depend on the batch). The log gets the cost, as
    soon as the first batch's steps are timed, and the concepts the stopping rule never stopped.
    """
    from tqdm.auto import tqdm

    runtime = runtime or Runtime()
    cache = cache or TensorCache("stage1")
    image_cache = image_cache or TensorCache("images")
    progress_cache = TensorCache(f"{cache.folder.name}-progress", cache.folder.parent, cache.enabled)
    model = bundle.fingerprint()
    image_settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                      num_inference_steps=config.image_steps)
    results: dict[int, ConceptTarget] = {}
    keys = [cache_key_for(model, r, z_layer, config, image_settings, bundle.device, runtime.precision)
            for r in requests]
    saved: dict[int, dict] = {}
    for index, key in enumerate(keys):
        entry = cache.load(key)
        if entry is not None:
            results[index] = ConceptTarget.from_tensors(requests[index], z_layer, entry[0])
        elif (state := progress_cache.load(key)) is not None:
            saved[index] = state[0]
    missing = [i for i in range(len(requests)) if i not in results]
    size = fitting_batch(bundle, [requests[i] for i in missing], z_layer, config, image_cache, runtime) \
        if missing else 1
    cached = len(requests) - len(missing)
    log.info("Stage I: %d of %d concepts read from the cache, %d to compute", cached, len(requests),
             len(missing))
    # Counted in concept-steps, so a batch that holds every concept (as on a GPU) still moves.
    resumed = sum(int(saved[i]["step"]) for i in missing if i in saved)
    with tqdm(total=len(missing) * config.steps, initial=resumed, desc="Stage I",
              unit="concept-step", disable=not progress) as bar:
        shown = {"loss": "-"}

        def show() -> None:
            bar.set_postfix(loss=shown["loss"], concepts=f"{len(results) - cached}/{len(missing)}")

        def report(steps: int, loss: float) -> None:
            shown["loss"] = f"{loss:.4f}"
            bar.update(steps)
            show()

        groups = _by_progress(missing, saved)
        # (concepts, the step they resume from) per group, before any saves progress
        starts = [(len(g), int(saved[g[0]]["step"]) if g[0] in saved else 0) for g in groups]
        untimed = True  # until the first batch's steps are timed

        def timed(concepts: int, steps: int, seconds: float) -> None:
            nonlocal untimed
            untimed = False
            log_cost(config, str(bundle.device), (concepts, steps, seconds), size, starts)

        for group in groups:
            while group:
                chunk = group[:size]
                if progress:
                    draw_images(bundle, [requests[i] for i in chunk], config, image_cache)
                try:
                    targets = _run_chunk(bundle, requests, keys, chunk, z_layer, config, runtime,
                                         image_cache, progress_cache, saved, report,
                                         timed if untimed else None)
                except torch.OutOfMemoryError:
                    if size == 1:
                        raise Stage1OutOfMemoryError(
                            "Stage I runs out of device memory even with one concept per batch: "
                            "try precision='bf16' or grad_checkpointing=True") from None
                    size //= 2
                    log.warning("Stage I out of memory; going on with %d concepts per batch", size)
                    free_memory()
                    continue
                for index, target in zip(chunk, targets):
                    cache.save(keys[index], target.to_tensors(),
                               {"source": target.request.source,
                                "destination": target.request.destination})
                    progress_cache.path(keys[index]).unlink(missing_ok=True)
                    results[index] = target
                show()
                group = group[len(chunk):]
    found = [replace(results[i], key=keys[i]) for i in range(len(requests))]
    log_unconverged(config, found)
    return found


def _run_chunk(bundle: ModelBundle, requests: list[EditRequest], keys: list[str], chunk: list[int],
               z_layer: dict[str, int], config: Stage1Config, runtime: Runtime,
               image_cache: TensorCache, progress_cache: TensorCache,
               saved: dict[int, dict], report,
               timed: TimingHook | None = None) -> list[ConceptTarget]:
    """One batch of concepts, resumed from and saving to ``progress_cache``."""

    def save_progress(states: list[dict[str, torch.Tensor]]) -> None:
        for index, state in zip(chunk, states, strict=True):
            progress_cache.save(keys[index], state, {"source": requests[index].source})
            saved[index] = state

    resume = [saved[i] for i in chunk] if chunk[0] in saved else None
    return compute_z(bundle, [requests[i] for i in chunk], z_layer, config, image_cache, runtime,
                     resume, save_progress if progress_cache.enabled else None, report, timed=timed)
