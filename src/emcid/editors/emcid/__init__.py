"""EMCID: Stage I (per-concept targets) followed by Stage II (one multi-layer closed form)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ...cache import TensorCache
from ...models import ModelBundle
from ...requests import EditRequest
from ...stats import DEFAULT_SAMPLES, read_corpus, second_moments
from ..base import Editor, register
from .stage1 import Stage1Config, compute_targets
from .stage2 import Stage2Config, compute_deltas

# Release values for SDXL (method.md 4.2) that differ from SD 1.x.
SDXL_STAGE1 = {"steps": 100, "lr": 0.1, "clamp_factor": 1.2, "align_weight": 0.005}


@dataclass
class EMCIDConfig:
    """Everything EMCID depends on besides the model and the requests."""

    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    layers: dict[str, list[int]] | None = None  # None: the family's release default
    task: str = "object"  # "artist" selects the artist layers (7..10 on SD 1.x)
    stats_samples: int = DEFAULT_SAMPLES
    corpus: str | None = None  # caption file for the statistics; None: the default corpus
    cache: bool = True
    # Stage I options for requests with reference images (ICEB's undrawable classes: true-noise
    # target, text alignment off); all requests still share one Stage II solve.
    reference_stage1: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.reference_stage1) - {f.name for f in fields(Stage1Config)}
        if unknown:
            raise ValueError(f"unknown Stage I options in reference_stage1: {sorted(unknown)}")

    def stage1_for(self, request: EditRequest) -> Stage1Config:
        if request.reference_images and self.reference_stage1:
            return replace(self.stage1, **self.reference_stage1)
        return self.stage1


def _split_options(options: dict) -> tuple[dict, dict, dict]:
    names1 = {f.name for f in fields(Stage1Config)}
    names2 = {f.name for f in fields(Stage2Config)}
    stage1 = {k: v for k, v in options.items() if k in names1}
    stage2 = {k: v for k, v in options.items() if k in names2}
    rest = {k: v for k, v in options.items() if k not in names1 | names2}
    return stage1, stage2, rest


def distributed_state():
    """accelerate's process state when launched on several processes (``accelerate launch``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None  # single process: skip importing accelerate
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate sees no distributed setup on a machine without CUDA, and
    # every process would run all of Stage I.
    return PartialState(cpu=not torch.cuda.is_available())


@register
class EMCIDEditor(Editor):
    name = "emcid"
    stage1_defaults: dict = {}  # what a variant changes in Stage I

    def __init__(self, config: EMCIDConfig | None = None):
        self.config = config or EMCIDConfig()

    @classmethod
    def create(cls, bundle: ModelBundle | None = None, **options) -> EMCIDEditor:
        """Flat options (``steps=50, lam=6000, layers=...``) over the family's defaults."""
        stage1, stage2, rest = _split_options(options)
        stage1 = {**cls.stage1_defaults, **stage1}
        if bundle is not None and bundle.family == "sdxl":
            stage1 = {**SDXL_STAGE1, **stage1}
        if bundle is not None and bundle.is_embedded:
            # The miniature model's own sampler settings stand in for SD's 7.5 / 50 steps, and
            # its small UNet is fastest with many concepts per Stage I batch (speed only).
            stage1 = {"image_guidance_scale": None, "image_steps": None, "concept_batch": 64, **stage1}
        unknown = set(rest) - {f.name for f in fields(EMCIDConfig)}
        if unknown:
            raise ValueError(f"unknown EMCID options: {sorted(unknown)}")
        return cls(EMCIDConfig(Stage1Config(**stage1), Stage2Config(**stage2), **rest))

    def hparams(self) -> dict:
        return asdict(self.config)

    def layers_for(self, bundle: ModelBundle) -> dict[str, list[int]]:
        layers = self.config.layers or bundle.default_layers(self.config.task)
        for slot_name, indices in layers.items():
            depth = bundle.slot(slot_name).num_layers
            if not indices or any(not 0 <= i < depth - 1 for i in indices):
                raise ValueError(
                    f"layers {indices} of {slot_name}: choose from 0..{depth - 2} (the last "
                    "block is never edited)"
                )
        return {k: sorted(set(v)) for k, v in layers.items()}

    def compute(self, bundle: ModelBundle, requests: list[EditRequest], progress: bool) -> dict:
        config = self.config
        layers = self.layers_for(bundle)
        z_layer = {slot: max(indices) for slot, indices in layers.items()}
        root_enabled = config.cache
        caches = (TensorCache("stage1", enabled=root_enabled), TensorCache("images", enabled=root_enabled))
        state = distributed_state()
        if state is not None:
            if not root_enabled:
                raise ValueError("multi-process Stage I shares results through the cache: enable it")
            # Each process computes its share into the shared cache; then all read everything.
            self._stage1(bundle, requests[state.process_index::state.num_processes], z_layer, caches,
                         progress)
            state.wait_for_everyone()
        targets = self._stage1(bundle, requests, z_layer, caches, progress)
        names = [bundle.slot(s).fc2_name(i) for s, indices in layers.items() for i in indices]
        corpus = read_corpus(Path(config.corpus)) if config.corpus else None
        moments = second_moments(bundle, names, corpus, config.stats_samples,
                                 cache=TensorCache("stats", enabled=root_enabled), progress=progress)
        return compute_deltas(bundle, targets, layers, moments, config.stage2, progress=progress)

    def _stage1(self, bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
                caches: tuple[TensorCache, TensorCache], progress: bool) -> list:
        """Stage I per group of requests sharing a config, returned in the requests' order."""
        groups: dict[str, tuple[Stage1Config, list[int]]] = {}
        for index, request in enumerate(requests):
            config = self.config.stage1_for(request)
            groups.setdefault(repr(config), (config, []))[1].append(index)
        targets: list = [None] * len(requests)
        for config, indices in groups.values():
            chosen = [requests[i] for i in indices]
            found = compute_targets(bundle, chosen, z_layer, config, *caches, progress)
            for index, target in zip(indices, found, strict=True):
                targets[index] = target
        return targets


@register
class MEMITEditor(EMCIDEditor):
    """MEMIT-style baseline: EMCID's multi-layer Stage II with targets from the text side only
    (pooled-output alignment to the destination; no diffusion distillation, no images)."""

    name = "memit"
    stage1_defaults = {"noise_weight": 0.0, "align_weight": 1.0}
