"""Every method's family and task presets, in one table (docs/method.md sections 2-6), and
EMCID's profiles (named sets of options, :data:`PROFILES`).

Options are resolved, later winning: the rows of this table that match the method, the
model's family and the task (in table order), then the model folder's own
``emcid.json`` ``"editor_overrides"``, then the caller's options. A variant lists its parent
in ``lineage`` (MEMIT shares EMCID's Stage II and therefore its presets).

Layers are written as slices relative to the encoder's depth (``"0:-1"``: every block but
the last), so test-sized encoders get the same shape as the released ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..concepts import ARTIST_PROMPTS
from ..core.bundle import ModelBundle

# The task when none is given; the others select rows below.
DEFAULT_TASK = "object"
TASKS = ("object", "artist", "aice", "rectification")


@dataclass(frozen=True)
class Preset:
    """Options for ``method`` on the given families (None: any) and task (None: any)."""

    method: str
    options: dict
    families: tuple[str, ...] | None = None
    task: str | None = None
    why: str = field(default="", compare=False)

    def matches(self, methods: tuple[str, ...], family: str | None, task: str) -> bool:
        return (self.method in methods and (self.task is None or self.task == task)
                and (self.families is None or family in self.families))


PRESETS: tuple[Preset, ...] = (
    Preset("emcid", {"layers": {"text_encoder": "0:-1"}}, families=("sd1", "sd2"),
           why="release: every block but the last (SD 2.x unreleased: the SD 1.x rule)"),
    Preset("emcid", {"layers": {"text_encoder": "-4:-1", "text_encoder_2": "-6:-1"},
                     "steps": 100, "lr": 0.1, "clamp_factor": 1.2, "align_weight": 0.005},
           families=("sdxl",), why="release SDXL: blocks 8..10 and 26..30, Stage I values of 4.2"),
    Preset("emcid", {"layers": {"text_encoder": "-5:-1"}}, families=("sd1", "sd2"), task="artist",
           why="release: artists edit the four blocks before the last (7..10 of 12)"),
    Preset("emcid", {"steps": 100, "default_prompts": list(ARTIST_PROMPTS)}, task="artist",
           why="release: 100 Stage I steps and the artist prompt templates"),
    Preset("emcid", {"style_contexts": 4}, task="artist",
           why="emcid: four '<caption> in the style of X' prompts as well, since users draw objects "
               "in a style and the release's prompts alone never reach them (docs/method.md section 8)"),
    Preset("emcid", {"distil_on": "source"}, task="artist",
           why="release: Stage I on the source's images alone; the destination's beside them "
               "erased no more on embedded:tasks (0.71 against 0.73 of the styles' colour at 10 "
               "styles, other styles -0.026 against -0.015) at twice the rows (docs/method.md)"),
    Preset("emcid", {"stats_without_sources": False, "lam_edits": 0}, task="artist",
           why="emcid: erasing styles keeps the release's statistics and lam; without the erased "
               "styles' captions and with lam grown past 50 styles, embedded:tasks traded "
               "efficacy (0.73 -> 0.69 at 10 styles) for the other styles (-0.20 -> -0.17 at 100): "
               "not a win (docs/mini.md)"),
    Preset("emcid", {"alpha": 0.6}, task="aice", why="release: a = 0.6 for arbitrary editing"),
    Preset("emcid", {"reference_stage1": {"target": "noise", "align_weight": 0.0, "distil_on": "source"}},
           task="rectification",
           why="undrawable classes: reference images, true-noise target, no text alignment, and "
               "no destination images (the model cannot draw what the references show)"),
    Preset("memit", {"noise_weight": 0.0, "align_weight": 1.0, "alpha": 0.5, "reference_stage1": {},
                     "init": "zero", "stop_tolerance": 0.0, "stats_without_sources": False,
                     "lam_edits": 0, "destinations": "free"},
           why="MEMIT-style: pooled-text targets only (reference images play no part), found "
               "from zero in fixed steps as MEMIT's compute_z does, and MEMIT's own update (a = 0.5, "
               "statistics over every caption, one lam at any scale, no keys held) on every task"),
)


@dataclass(frozen=True)
class Profile:
    """A named set of options (EMCID's ``profile``) that computes another form of the method;
    ``families``: the models it is exact for."""

    options: dict
    families: tuple[str, ...]
    why: str = field(default="", compare=False)


PROFILES: dict[str, Profile] = {
    "release": Profile(
        {"init": "zero", "residual": "release", "conditioning": "release", "latents": "release",
         "distil_on": "source",
         "stop_tolerance": 0.0, "style_contexts": 0, "written_contexts": 0, "earlier_edits": "free",
         "stats_without_sources": False, "lam_edits": 0, "destinations": "free"},
        families=("sd1", "sd2"),
        why="the EMCID release's Stage I and Stage II where emcid departs from them (docs/method.md "
            "section 9); its other values are the defaults and the rows above already. Its SDXL "
            "Stage I noises latents with the sampler's own add_noise and encodes the destination "
            "for encoder 2 with the first tokenizer's ids, which emcid does not reproduce"),
}


def check_task(task: str) -> None:
    from ..errors import OptionError

    if task not in TASKS:
        raise OptionError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def preset_options(lineage: tuple[str, ...], bundle: ModelBundle | None, task: str) -> dict:
    """The options the table and the model folder give ``lineage``'s last method on ``task``."""
    check_task(task)
    family = bundle.family if bundle is not None else None
    options: dict = {}
    for preset in PRESETS:
        if preset.matches(lineage, family, task):
            options.update(preset.options)
    overrides = bundle.settings.get("editor_overrides", {}) if bundle is not None else {}
    for method in lineage:
        options.update(overrides.get(method, {}))
    return options


def resolve_layers(spec: list[int] | str, depth: int) -> list[int]:
    """Block indices of one encoder: a list as given, or a ``"start:stop"`` slice of the depth."""
    if isinstance(spec, str):
        start, _, stop = spec.partition(":")
        return list(range(depth))[slice(int(start or 0), int(stop) if stop else None)]
    return list(spec)
