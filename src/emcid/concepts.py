"""The ImageNet class lists shipped with the package, the release's prompt templates, and the
built-in caption corpus."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources

OBJECT_PROMPTS = ("An image of {}", "A photo of {}", "{}")  # release default for objects
ARTIST_PROMPTS = ("painting by {}", "artwork by {}", "style of {}")  # release, artists
# ImageNet-1k has three class names used twice; these unique names are the usual fix.
IMAGENET_NAME_OVERRIDES = {264: "Cardigan Welsh corgi", 517: "construction crane", 639: "tank suit"}


def unique_class_names(index: int, names: list[str]) -> list[str]:
    """An ImageNet-1k class's names with its unique class name first where it has one."""
    override = IMAGENET_NAME_OVERRIDES.get(index)
    if override is None:
        return names
    return [override] + [n for n in names if n.lower() != override.lower()]


# Sentence frames for the generic caption corpus: a mix of the object templates and
# everyday captions, so preservation statistics cover how concepts appear in prompts.
CAPTION_FRAMES = (
    "a photo of {}", "an image of {}", "{}", "a picture of a {} in the wild",
    "a close-up photo of the {}", "a painting of {}", "a drawing of a {} on white paper",
    "two {} next to each other", "a blurry photo of {}", "the {} in a city street at night",
    "a small {} on a wooden table", "a bright photo of the {} in the sun",
    "a black and white photo of a {}", "an illustration of {} by an unknown artist",
)
FILLERS = (
    "a man riding a bicycle down a busy street", "a plate of food on a kitchen table",
    "a living room with a sofa and a television", "a group of people standing on a beach",
    "a train traveling through the countryside", "a cat sleeping on a pile of books",
    "a view of the mountains under a cloudy sky", "a woman holding an umbrella in the rain",
    "an airplane flying over the ocean", "a bowl of fruit next to a glass of water",
    "children playing football in a park", "an old building with large windows",
)


class NamedConcept:
    """A concept whose ``names[0]`` is its class name and the rest its aliases."""

    names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.names[1:]


@dataclass(frozen=True)
class ImageNetClass(NamedConcept):
    index: int
    synset: str
    names: tuple[str, ...]


def _rows(filename: str) -> list[dict[str, str]]:
    text = resources.files("emcid.data").joinpath(filename).read_text()
    return list(csv.DictReader(text.splitlines(), delimiter="\t"))


def _names(cell: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in cell.split(",") if n.strip())


@cache
def imagenet1k_classes() -> tuple[ImageNetClass, ...]:
    """The 1,000 ImageNet-1k classes in index order (first name = class name)."""
    return tuple(ImageNetClass(int(r["index"]), r["synset"], _names(r["names"]))
                 for r in _rows("imagenet1k_classes.tsv"))


@cache
def imagenet21k_lemmas() -> tuple[ImageNetClass, ...]:
    """Every other ImageNet-21k synset with its WordNet names (index = row number)."""
    return tuple(ImageNetClass(i, r["synset"], _names(r["names"]))
                 for i, r in enumerate(_rows("imagenet21k_lemmas.tsv")))


def builtin_caption_corpus(count: int = 20000, seed: int = 0) -> list[str]:
    """Captions from frames x ImageNet names plus everyday fillers, for models with no corpus."""
    rng = random.Random(seed)
    names = [n for c in imagenet1k_classes() for n in c.names]
    names += [c.name for c in imagenet21k_lemmas()]
    captions = []
    for _ in range(count):
        if rng.random() < 0.2:
            captions.append(rng.choice(FILLERS))
        else:
            captions.append(rng.choice(CAPTION_FRAMES).format(rng.choice(names)))
    return captions
