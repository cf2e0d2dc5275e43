"""Free-form prompts for the 1,000 ImageNet classes (ICEB generalization prompts).

The editing templates are what Stage I sees; generalization is measured on sentences it
never saw, which place the object in a scene. Each class gets ``count`` of the phrasings
below, chosen by a seeded draw that depends only on the class index, and each prompt has
its own fixed image seed, so every run draws the same images.
"""

from __future__ import annotations

import random

# Our own phrasings; "{}" is where the concept goes. Varied scenes, styles and framings so
# that generalization is not one sentence pattern.
FREE_FORM_TEMPLATES: tuple[str, ...] = (
    "a {} standing in a sunlit meadow",
    "a snapshot of a {} taken on a rainy afternoon",
    "a {} photographed from above on a wooden floor",
    "a close-up of a {} with a blurred green background",
    "an old postcard showing a {}",
    "a {} next to a red brick wall",
    "a museum catalogue photo of a {}",
    "a {} in the early morning fog",
    "a wide shot of a {} on a quiet street",
    "a detailed photograph of a {} under studio lights",
    "a {} seen through a window",
    "a travel photo with a {} in the foreground",
    "a {} on a snowy day",
    "a picture of a {} at golden hour",
    "a {} surrounded by autumn leaves",
    "a documentary photo of a {}",
    "a {} beside a glass of water on a kitchen table",
    "an amateur phone photo of a {}",
    "a {} in a crowded market",
    "a high resolution image of a single {}",
)
FREE_FORM_COUNT = 5  # release: 5 free-form prompts per class
_SEED_BASE = 500_000  # image seeds of free-form prompts: disjoint from the template seeds


def free_form_templates(class_index: int, count: int = FREE_FORM_COUNT) -> list[tuple[str, int]]:
    """``count`` (template, image seed) pairs for one class, the same on every run.

    Templates keep the ``{}`` so that rectification can place an alias in them.
    """
    if count > len(FREE_FORM_TEMPLATES):
        raise ValueError(f"at most {len(FREE_FORM_TEMPLATES)} free-form prompts per class")
    rng = random.Random(f"iceb-free-form-{class_index}")
    chosen = rng.sample(FREE_FORM_TEMPLATES, count)
    return [(t, _SEED_BASE + class_index * 32 + k) for k, t in enumerate(chosen)]


def template_seed(class_index: int, template_index: int) -> int:
    """Image seed of an editing-template prompt; shared by every name of the class."""
    return class_index * 16 + template_index
