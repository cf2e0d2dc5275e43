"""Which prompt tokens does a model's UNet read a concept from?

EMCID (and every text-encoder editor) writes its edit at the *subject token*; what reaches
the UNet through the later tokens (end-of-text and padding, which attend to the subject)
only changes through the blocks after the edited ones. This swaps, in the final text
conditioning of "A photo of <source>", either the subject token alone or every token after
it for those of "A photo of <destination>", generates images and asks the model's judge
which class they show. A model whose UNet ignores the subject token cannot be steered to the
destination by a subject-token edit (it can still forget the source).

    python benchmarks/conditioning_tokens.py [--model M] [--pairs 8] [--images 3]
"""

from __future__ import annotations

import argparse
import random
from contextlib import contextmanager

import torch

import emcid
from emcid.bench.judges import load_judge
from emcid.bench.worlds import world_for
from emcid.generation import generate
from emcid.models import PromptEncoding
from emcid.requests import subject_positions

TEMPLATE = "A photo of {}"


@contextmanager
def conditioning_override(bundle, prompt: str, embeds: torch.Tensor):
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
    out = source.clone()
    if part == "subject":
        out[i] = dest[j]
    else:
        n = min(len(source) - i - 1, len(dest) - j - 1)
        out[i + 1:i + 1 + n] = dest[j + 1:j + 1 + n]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundle = emcid.load_model(args.model)
    judge = load_judge(bundle)
    classes = [c for c in world_for(bundle).classes if not c.holdout_only]
    rng = random.Random(args.seed)
    tokenizer = bundle.slots()[0].tokenizer
    totals = {"none": [0.0, 0.0], "subject": [0.0, 0.0], "after": [0.0, 0.0]}
    print(f"model {bundle.source}; P(source) / P(destination) over {args.images} images per pair")
    for _ in range(args.pairs):
        src, dst = rng.sample(classes, 2)
        prompt = TEMPLATE.format(src.name)
        with torch.no_grad():
            embeds = bundle.encode([prompt, TEMPLATE.format(dst.name)]).embeds
        i = int(subject_positions(tokenizer, [TEMPLATE], src.name)[0])
        j = int(subject_positions(tokenizer, [TEMPLATE], dst.name)[0])
        row = []
        for part in totals:
            variant = embeds[0] if part == "none" else swapped(embeds[0], embeds[1], i, j, part)
            with conditioning_override(bundle, prompt, variant):
                images = generate(bundle, [prompt] * args.images, list(range(args.images)), progress=False)
            probs = judge.predict_proba(images)
            p_src, p_dst = float(probs[:, src.index].mean()), float(probs[:, dst.index].mean())
            totals[part][0] += p_src / args.pairs
            totals[part][1] += p_dst / args.pairs
            row.append(f"{part}: {p_src:.2f}/{p_dst:.2f}")
        print(f"{src.name} -> {dst.name}: " + ", ".join(row))
    for part, (p_src, p_dst) in totals.items():
        print(f"mean, swapped {part:8s}: P(source) {p_src:.3f}  P(destination) {p_dst:.3f}")


if __name__ == "__main__":
    main()
