"""EMCID's hyperparameters: Stage I's, Stage II's and the editor's own (what a patch depends on
besides the model and the requests). Field names and order are part of Stage I's cache keys."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import torch

from ...core.config import build, check_bool, check_choice, check_float, check_int
from ...core.stats import DEFAULT_SAMPLES
from ...errors import OptionError
from ...requests.edit import EditRequest
from ..presets import PROFILES

Precision = Literal["auto", "fp32", "bf16", "fp16"]
FP16_LOSS_SCALE = 1024.0  # fp16 gradients of a small MSE would underflow unscaled


@dataclass
class Stage1Config:
    """Stage I hyperparameters; defaults are the release values for SD 1.x (docs/method.md).

    Presets for SDXL and artists live in ``emcid.editors.presets``.
    """

    steps: int = 200  # release: 200 (100 for artists, 100 for SDXL)
    lr: float = 0.2  # release: Adam 0.2 (SDXL 0.1)
    # "constant" (release): lr at every step; "cosine": from lr down to 0 over the steps
    # (stage1/engine.py's learning_rate), large steps first and settled ones at the end.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    noise_weight: float = 1.0  # release: weight of the diffusion noise prediction loss
    align_weight: float = 0.01  # release: 0.01 for SD 1.x, 0.005 for SDXL
    norm_decay: float = 5e-4  # release: 5e-4 * ||delta|| / ||v_src||^2
    clamp_factor: float = 1.5  # release: ||delta|| <= 1.5 ||v_src|| (SDXL 1.2)
    target: Literal["teacher", "noise"] = "teacher"  # "noise": regress on the true noise
    image_guidance_scale: float | None = 7.5  # release: source images at guidance 7.5
    image_steps: int | None = 50  # release: 50 sampling steps; None = the model's default
    # Where delta starts. "text" (emcid): the destination's state at l* minus the source's, at
    # their subject tokens (far edits otherwise settle on a third concept, docs/method.md);
    # "zero": the release's start.
    init: Literal["text", "zero"] = "text"
    # How the UNet is conditioned. "pipeline" (emcid): 77 tokens, no mask, as the SD pipelines
    # do in use; "release": each concept's prompts padded to the longest of them and encoded
    # with the attention mask, source and destination apart (conditioning.py).
    conditioning: Literal["pipeline", "release"] = "pipeline"
    # The source images' latents. "mean" (emcid): the VAE posterior mean, deterministic;
    # "release": each image flipped left-right with probability 1/2 once, then a fresh draw
    # from the posterior at every step (latents.py).
    latents: Literal["mean", "release"] = "mean"
    # Whose images the noise prediction loss noises (latents.py): "both" (emcid) each prompt's
    # source image and the unedited model's image of its destination prompt, a row each (twice
    # a source-only step's rows; attribute edits otherwise stop half way, docs/method.md);
    # "source" the release's; "destination" the destination's alone.
    distil_on: Literal["source", "destination", "both"] = "both"
    # The noise prediction loss's timesteps are drawn uniformly from [min_timestep, DDPM's
    # training steps); release: 0.
    min_timestep: int = 0
    # Stopping rule (stopping.py): from min_steps on, a concept stops at the end of the first
    # window of stop_window steps whose mean loss fell by less than stop_tolerance of the
    # previous window's; steps stays the most it runs (a rule that could stop nothing within
    # them is refused). 0: every concept runs all steps (the release, and the default: 0.1
    # kept ICEB within 0.02 of 200 fixed steps but halved the colour-word edits of TIMED's
    # analogue; docs/method.md).
    stop_tolerance: float = 0.0
    stop_window: int = 25
    min_steps: int = 50

    def __post_init__(self) -> None:
        check_int("Stage I", "steps", self.steps)
        check_float("Stage I", "lr", self.lr, low=0, low_open=True)
        for name in ("noise_weight", "align_weight", "norm_decay"):
            check_float("Stage I", name, getattr(self, name), low=0)
        check_float("Stage I", "clamp_factor", self.clamp_factor, low=0, low_open=True)
        check_choice("Stage I", "target", self.target, ("teacher", "noise"))
        check_choice("Stage I", "lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_choice("Stage I", "init", self.init, ("text", "zero"))
        check_choice("Stage I", "conditioning", self.conditioning, ("pipeline", "release"))
        check_choice("Stage I", "latents", self.latents, ("mean", "release"))
        check_choice("Stage I", "distil_on", self.distil_on, ("source", "destination", "both"))
        check_float("Stage I", "stop_tolerance", self.stop_tolerance, low=0, high=1, high_open=True)
        check_int("Stage I", "min_timestep", self.min_timestep, minimum=0)
        check_int("Stage I", "stop_window", self.stop_window)
        check_int("Stage I", "min_steps", self.min_steps)
        if self.stop_tolerance > 0 and self.earliest_stop > self.steps:
            raise OptionError(
                f"Stage I stop_tolerance={self.stop_tolerance:g}: the rule stops nothing before step "
                f"{self.earliest_stop} (min_steps {self.min_steps}, stop_window {self.stop_window}), "
                f"but steps={self.steps}: lower min_steps or raise steps")
        if self.image_guidance_scale is not None:
            check_float("Stage I", "image_guidance_scale", self.image_guidance_scale, low=0)
        if self.image_steps is not None:
            check_int("Stage I", "image_steps", self.image_steps)

    @property
    def earliest_stop(self) -> int:
        """The first step the stopping rule can stop a concept at: a window's end from
        ``min_steps`` on, and not the first window, which only sets the baseline."""
        return max(2 * self.stop_window, math.ceil(self.min_steps / self.stop_window) * self.stop_window)


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that has it (fp16 on older ones), fp32 elsewhere (CPU
    autocast is slower than fp32 on most CPUs)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class Stage2Config:
    """Stage II hyperparameters; defaults are the release values where the comments do not
    say emcid's own (docs/method.md, section 9)."""

    lam: float = 4000.0  # release: preservation weight 4000 (6000 for RoAD)
    # > 0: lam holds for up to this many edits and grows in proportion beyond them,
    # lam x max(1, edits / lam_edits), the edits counting this batch's concepts and those held
    # from earlier patches: C's weight against the edits' a K K^T then stays the same at any
    # scale (docs/method.md; 50: measured on ICEB, docs/iceb.md); 0: lam at any scale (the release)
    lam_edits: int = 50
    alpha: float = 0.5  # release: editing strength 0.5 (0.6 for arbitrary editing)
    # memit: per-prompt targets against block l*'s output; release: the EMCID release's one
    # target per concept against the mean fc2 output (stage2.py)
    residual: Literal["memit", "release"] = "memit"
    # none: the closed form over all key directions; nullspace: only the directions C's
    # eigenvalues below nullspace_threshold x its largest span, less the keys earlier patches
    # in the chain edited (nullspace.py; docs/method.md)
    projection: Literal["none", "nullspace"] = "none"
    nullspace_threshold: float = 1e-2
    # In a sequential edit (a model carrying patches): replay: solve this batch with every
    # request the chain's patches made, on the base model, and add the difference to what the
    # chain added, so the chain holds one batch of all its concepts (replay.py; earlier
    # targets from the Stage I cache; a chain of this editor's patches only); hold: the keys
    # of the concepts the chain edited enter the closed form with the edits' weight (one
    # batch's objective for one block; docs/method.md); free: each batch alone (emcid before
    # 2026-12-06). The null space removes the held keys from its space with hold or free.
    earlier_edits: Literal["replay", "hold", "free"] = "replay"
    # concept: one key per concept, the mean over its prompts (the release); prompt: one key
    # per prompt, for prompts whose keys differ too much to share one (style contexts)
    keys: Literal["concept", "prompt"] = "concept"
    # keep (emcid): each edit's destination, in its edit's prompts, enters the closed form held
    # as an earlier batch's keys are, with the edits' weight, but not counted by lam_edits, so
    # a destination keeps drawing what Stage I distilled towards (stage2.held_destinations
    # says which are held; docs/method.md); free: the release's, destinations unguarded.
    destinations: Literal["keep", "free"] = "keep"

    def __post_init__(self) -> None:
        # lam = 0 leaves a K K^T, singular for fewer edits than key width: refused.
        check_float("Stage II", "lam", self.lam, low=0, low_open=True)
        check_int("Stage II", "lam_edits", self.lam_edits, minimum=0)
        check_float("Stage II", "alpha", self.alpha, low=0, high=1, low_open=True, high_open=True)
        check_choice("Stage II", "residual", self.residual, ("memit", "release"))
        check_choice("Stage II", "projection", self.projection, ("none", "nullspace"))
        check_choice("Stage II", "earlier_edits", self.earlier_edits, ("replay", "hold", "free"))
        check_choice("Stage II", "keys", self.keys, ("concept", "prompt"))
        check_choice("Stage II", "destinations", self.destinations, ("keep", "free"))
        if self.keys == "prompt" and self.residual == "release":
            raise OptionError("Stage II keys='prompt' needs residual='memit': the release's residual "
                              "has one target per concept")
        check_float("Stage II", "nullspace_threshold", self.nullspace_threshold, low=0, high=1,
                    low_open=True, high_open=True)

    def lam_for(self, edits: int) -> float:
        """The preservation weight for ``edits`` edited concepts (held ones included)."""
        return self.lam * max(1.0, edits / self.lam_edits) if self.lam_edits else self.lam


MAX_STYLE_CONTEXTS = 64
# Stage II options added after patches were first written, with the value those patches had.
STAGE2_BEFORE_OPTIONS = {"destinations": "free"}
STAGE1_KEYS = frozenset(f.name for f in fields(Stage1Config))
STAGE2_KEYS = frozenset(f.name for f in fields(Stage2Config))


@dataclass
class EMCIDConfig:
    """Every EMCID hyperparameter (what a patch depends on besides the model and requests)."""

    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    # Edited blocks per text encoder: index lists, or "start:stop" slices of the depth
    # (the presets' form); None: the family's preset for objects.
    layers: dict[str, list[int] | str] | None = None
    stats_samples: int = DEFAULT_SAMPLES
    corpus: str | None = None  # caption file for the statistics; None: the default corpus
    # Leave out of the statistics every caption that names an edited source (core/stats.py's
    # captions_without): C then preserves what the edit keeps, not what it changes. False: the
    # release's statistics over every caption.
    stats_without_sources: bool = True
    # The captions that share a word piece with an edited source but name none (its token
    # neighbours, core/stats.py) weigh this many times as much in the statistics, the others
    # no less: the keys of those concepts lie next to the sources', where an edit spills
    # (docs/iceb.md). 1: as any caption.
    neighbour_weight: float = 1.0
    # Stage I options for requests with reference images (ICEB's undrawable classes: true-noise
    # target, text alignment off); all requests still share one Stage II solve.
    reference_stage1: dict = field(default_factory=dict)
    # Prompt templates for requests that kept the object default (the artist task's own).
    default_prompts: list[str] | None = None
    # "<caption> in the style of X" prompts added to each request that takes default_prompts
    # (contexts.py): styles are drawn on objects, whose captions come before the style's name.
    style_contexts: int = 0
    # More such prompts for Stage II alone, after Stage I: target = own state + the concept's delta.
    written_contexts: int = 0
    # A named set of options (emcid.editors.presets.PROFILES), which every option must agree
    # with: "release", the EMCID release's. None: none.
    profile: str | None = None

    def __post_init__(self) -> None:
        check_int("EMCID", "stats_samples", self.stats_samples)
        check_bool("EMCID", "stats_without_sources", self.stats_without_sources)
        check_float("EMCID", "neighbour_weight", self.neighbour_weight, low=1)
        for key in ("style_contexts", "written_contexts"):
            count = getattr(self, key)
            check_int("EMCID", key, count, minimum=0)
            if count > MAX_STYLE_CONTEXTS:
                raise OptionError(f"EMCID option {key}={count}: at most {MAX_STYLE_CONTEXTS} "
                                  "(each is one more prompt per concept)")
        self._check_profile()
        build(Stage1Config, self.reference_stage1, "reference_stage1 (Stage I)")
        if self.layers is not None and (not isinstance(self.layers, dict) or not all(
                isinstance(v, str) or (isinstance(v, list | tuple) and all(
                    isinstance(i, int) and not isinstance(i, bool) for i in v))
                for v in self.layers.values())):
            raise OptionError(f"EMCID option layers={self.layers!r}: give e.g. "
                              "{'text_encoder': [7, 8, 9, 10]}")
        if self.default_prompts is not None:
            # EditRequest checks each template; one probe request is enough.
            EditRequest("probe", "check", tuple(self.default_prompts))

    def _check_profile(self) -> None:
        """The profile exists and the options hold its values (a patch records both)."""
        if self.profile is None:
            return
        if self.profile not in PROFILES:
            raise OptionError(f"unknown EMCID profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        for key, value in PROFILES[self.profile].options.items():
            given = getattr(self.stage1 if key in STAGE1_KEYS else self.stage2 if key in STAGE2_KEYS
                            else self, key)
            if given != value:
                raise OptionError(f"profile {self.profile!r} sets {key}={value!r}; drop {key}={given!r} "
                                  "or the profile")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def flatten(data: dict) -> dict:
        """:meth:`to_dict`'s nested ``stage1``/``stage2`` mappings as flat options."""
        flat = dict(data)
        nested = {}
        for key in ("stage1", "stage2"):
            part = flat.pop(key, {})
            if not isinstance(part, dict):
                raise OptionError(f"EMCID option {key}={part!r}: give a mapping of option names")
            nested.update(part)
        return {**nested, **flat}

    @classmethod
    def from_dict(cls, data: dict) -> EMCIDConfig:
        """From :meth:`to_dict`'s nested form or flat options (``steps``, ``lam``, ...); a
        ``profile``'s options fill in those not given."""
        flat = cls.flatten(data)
        flat = {**PROFILES[flat["profile"]].options, **flat} if flat.get("profile") in PROFILES else flat
        stage1 = {k: flat.pop(k) for k in list(flat) if k in STAGE1_KEYS}
        stage2 = {k: flat.pop(k) for k in list(flat) if k in STAGE2_KEYS}
        return build(cls, {**flat, "stage1": build(Stage1Config, stage1, "EMCID Stage I"),
                           "stage2": build(Stage2Config, stage2, "EMCID Stage II")}, "EMCID")

    def stage1_for(self, request: EditRequest) -> Stage1Config:
        if request.reference_images and self.reference_stage1:
            return replace(self.stage1, **self.reference_stage1)
        return self.stage1
