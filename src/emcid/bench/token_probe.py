"""Which prompt tokens does a model's UNet read a concept from?

EMCID (and every text-encoder editor) writes its edit at the *subject token*; what reaches
the UNet through the later tokens (end of text and padding, which attend to the subject)
changes only through the blocks after the edited ones. In the final text conditioning of
"A photo of <source>" the probe replaces

- ``subject``: the subject's last token by that of "A photo of <destination>";
- ``after``: every token after the subject by those of the destination prompt;
- ``clean-pad``: every padding token (after the end of text) by the states of the empty
  prompt at the same positions ("clean" padding, Toker et al., NAACL 2025);

then generates images and asks the judge which class they show. Stable Diffusion 1.x reads
the prompt's own tokens and ignores padding: ``subject`` draws the destination and
``clean-pad`` keeps the source (docs/mini.md states the embedded model's bars).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..core.bundle import ModelBundle, PromptEncoding
from ..core.generation import generate
from ..core.tokens import subject_positions

TEMPLATE = "A photo of {}"
PARTS = ("none", "subject", "after", "clean-pad")


@contextmanager
def conditioning_override(bundle: ModelBundle, prompt: str, embeds: torch.Tensor) -> Iterator[None]:
    """Make ``bundle.encode`` return ``embeds`` for ``prompt`` (everything else unchanged)."""
    original = bundle.encode

    def encode(prompts):
        encoding = original(prompts)
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        if rows:
            encoding.embeds[rows] = embeds.to(encoding.embeds)
        return PromptEncoding(encoding.embeds, encoding.pooled, encoding.added_text_embeds)

    bundle.encode = encode
    try:
        yield
    finally:
        bundle.encode = original


def swapped(source: torch.Tensor, dest: torch.Tensor, i: int, j: int, part: str) -> torch.Tensor:
    """The source prompt's states with its subject token (at i) or what follows it replaced
    by the destination prompt's (subject at j)."""
    out = source.clone()
    if part == "subject":
        out[i] = dest[j]
    else:
        n = min(len(source) - i - 1, len(dest) - j - 1)
        out[i + 1 : i + 1 + n] = dest[j + 1 : j + 1 + n]
    return out


def clean_padded(source: torch.Tensor, clean: torch.Tensor, end_of_text: int) -> torch.Tensor:
    """The source prompt's states with every padding position taken from the empty prompt."""
    out = source.clone()
    out[end_of_text + 1 :] = clean[end_of_text + 1 :]
    return out


def end_of_text_position(tokenizer, prompt: str) -> int:
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return len(ids) - 1


@dataclass
class PairResult:
    """Mean judge probabilities of the source and destination class per variant."""

    source: str
    destination: str
    probs: dict[str, tuple[float, float]]  # part -> (P(source), P(destination))


def probe_pair(bundle: ModelBundle, judge, src, dst, images: int = 3) -> PairResult:
    """Generate ``images`` seeded images per variant of "A photo of <src>" and judge them."""
    tokenizer = bundle.slots()[0].tokenizer
    prompt = TEMPLATE.format(src.name)
    with torch.no_grad():
        embeds = bundle.encode([prompt, TEMPLATE.format(dst.name), ""]).embeds
    i = int(subject_positions(tokenizer, [TEMPLATE], src.name)[0])
    j = int(subject_positions(tokenizer, [TEMPLATE], dst.name)[0])
    variants = {
        "none": embeds[0],
        "subject": swapped(embeds[0], embeds[1], i, j, "subject"),
        "after": swapped(embeds[0], embeds[1], i, j, "after"),
        "clean-pad": clean_padded(embeds[0], embeds[2], end_of_text_position(tokenizer, prompt)),
    }
    probs = {}
    for part, variant in variants.items():
        with conditioning_override(bundle, prompt, variant):
            drawn = generate(bundle, [prompt] * images, list(range(images)), progress=False)
        p = judge.predict_proba(drawn)
        probs[part] = (float(p[:, src.index].mean()), float(p[:, dst.index].mean()))
    return PairResult(src.name, dst.name, probs)


def probe(
    bundle: ModelBundle, judge, classes: Sequence, pairs: int = 16, images: int = 3, seed: int = 0
) -> tuple[list[PairResult], dict[str, tuple[float, float]]]:
    """Probe ``pairs`` seeded random (source, destination) pairs; returns them and the means."""
    rng = random.Random(seed)
    results = [probe_pair(bundle, judge, *rng.sample(list(classes), 2), images) for _ in range(pairs)]
    means = {
        part: tuple(sum(r.probs[part][k] for r in results) / len(results) for k in (0, 1))
        for part in PARTS
    }
    return results, means
