"""The classes an ICEB run works on: the 1,000 ImageNet classes, or the embedded world.

Both are reduced to :class:`BenchClass` records (index = the judge's class index, names,
free-form templates with their seeds, whether the class may only be a holdout class), so
the benchmark code is the same for Stable Diffusion and for the miniature model.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..concepts import OBJECT_PROMPTS, NamedConcept, imagenet1k_classes, unique_class_names
from ..core.bundle import ModelBundle
from .prompts import free_form_templates

log = logging.getLogger(__name__)

EDIT_TEMPLATES: tuple[str, ...] = OBJECT_PROMPTS


@dataclass(frozen=True)
class BenchClass(NamedConcept):
    """One ICEB class; ``names[0]`` is its class name, the rest its aliases."""

    index: int
    names: tuple[str, ...]
    free_form: tuple[tuple[str, int], ...]  # (template with "{}", image seed)
    holdout_only: bool = False
    synset: str = ""


@dataclass
class World:
    """Classes, editing templates, and where rectification finds reference images."""

    name: str
    classes: list[BenchClass]
    templates: tuple[str, ...] = EDIT_TEMPLATES
    reference_dir: Path | None = None  # SD: real images in <dir>/<synset or index>/*

    def reference_images(self, cls: BenchClass, out: Path, count: int = 3) -> list[str]:
        """Images of a class the model cannot draw: rendered (embedded world) or real (a folder)."""
        if self.name == "mini":
            from ..mini.world import render

            folder = out / "references" / str(cls.index)
            folder.mkdir(parents=True, exist_ok=True)
            paths = []
            for k in range(count):
                path = folder / f"{k}.png"
                if not path.exists():
                    render(cls.index, 90_000 + k).save(path)
                paths.append(str(path))
            return paths
        if self.reference_dir is None:
            return []
        for sub in (cls.synset, str(cls.index)):
            folder = self.reference_dir / sub
            if sub and folder.is_dir():
                files = sorted(p for p in folder.iterdir()
                               if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
                return [str(p) for p in files[:count]]
        return []


def imagenet_world(reference_dir: str | Path | None = None) -> World:
    """The 1,000 ImageNet-1k classes with unique class names and unambiguous aliases.

    An alias shared by two classes (e.g. "crane") or equal to another class's name would
    make an edit request ambiguous, so it is dropped.
    """
    raw = []
    for c in imagenet1k_classes():
        raw.append((c, unique_class_names(c.index, list(c.names))))
    counts = Counter(n.lower() for _, names in raw for n in set(x.lower() for x in names))
    class_names = {names[0].lower() for _, names in raw}
    classes = []
    for c, names in raw:
        aliases = [n for n in names[1:] if counts[n.lower()] == 1 and n.lower() not in class_names]
        classes.append(BenchClass(c.index, (names[0], *aliases), tuple(free_form_templates(c.index)),
                                  synset=c.synset))
    return World("imagenet", classes, reference_dir=Path(reference_dir) if reference_dir else None)


def mini_world() -> World:
    """The embedded world: 1,000 ImageNet-1k concepts (editable) and 1,000 extra (holdout only)."""
    from ..mini import world

    classes = []
    for concept in world.load_concepts():
        free = []
        for prompt, seed in world.free_form_prompts(concept):
            # The world formats its prompts with the class name; keep a template so that
            # rectification can put an alias in the same sentence.
            if concept.name not in prompt:
                continue
            template = prompt.replace("{", "{{").replace("}", "}}").replace(concept.name, "{}", 1)
            free.append((template, int(seed)))
        classes.append(BenchClass(concept.index, tuple(concept.names), tuple(free),
                                  holdout_only=concept.split != "imagenet1k", synset=concept.synset))
    return World("mini", classes, tuple(world.EDIT_TEMPLATES))


def world_for(bundle: ModelBundle, reference_dir: str | Path | None = None) -> World:
    """The embedded world for the embedded model, ImageNet for everything else."""
    return mini_world() if bundle.is_embedded else imagenet_world(reference_dir)
