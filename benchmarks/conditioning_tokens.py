"""Which prompt tokens does a model's UNet read a concept from?

EMCID (and every text-encoder editor) writes its edit at the *subject token*; what reaches
the UNet through the later tokens (end-of-text and padding, which attend to the subject)
only changes through the blocks after the edited ones. In the final text conditioning of
"A photo of <source>" this replaces

- (a) ``subject``: the subject's last token by that of "A photo of <destination>";
- (b) ``after``: every token after the subject by those of the destination prompt;
- (c) ``clean-pad``: every padding token (after the end of text) by the states of the empty
  prompt at the same positions ("clean" padding, as in Toker et al., NAACL 2025);

then generates images and asks the model's judge which class they show. Stable Diffusion
1.x reads the prompt's own tokens and ignores padding: (a) draws the destination and (c)
keeps the source. Bars for the embedded model (docs/mini.md): mean P(destination) >= 0.6
under (a) and mean P(source) >= 0.9 under (c), over at least 16 random pairs.

    python benchmarks/conditioning_tokens.py [--model M] [--pairs 16] [--images 3]
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
    """The source prompt's states with its subject token (at i) or what follows it replaced
    by the destination prompt's (subject at j)."""
    out = source.clone()
    if part == "subject":
        out[i] = dest[j]
    else:
        n = min(len(source) - i - 1, len(dest) - j - 1)
        out[i + 1:i + 1 + n] = dest[j + 1:j + 1 + n]
    return out


def clean_padded(source: torch.Tensor, clean: torch.Tensor, end_of_text: int) -> torch.Tensor:
    """The source prompt's states with every padding position taken from the empty prompt."""
    out = source.clone()
    out[end_of_text + 1:] = clean[end_of_text + 1:]
    return out


def end_of_text_position(tokenizer, prompt: str) -> int:
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return len(ids) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundle = emcid.load_model(args.model)
    judge = load_judge(bundle)
    classes = [c for c in world_for(bundle).classes if not c.holdout_only]
    rng = random.Random(args.seed)
    tokenizer = bundle.slots()[0].tokenizer
    totals = {part: [0.0, 0.0] for part in ("none", "subject", "after", "clean-pad")}
    print(f"model {bundle.source}; P(source) / P(destination) over {args.images} images per pair")
    for _ in range(args.pairs):
        src, dst = rng.sample(classes, 2)
        prompt = TEMPLATE.format(src.name)
        with torch.no_grad():
            embeds = bundle.encode([prompt, TEMPLATE.format(dst.name), ""]).embeds
        i = int(subject_positions(tokenizer, [TEMPLATE], src.name)[0])
        j = int(subject_positions(tokenizer, [TEMPLATE], dst.name)[0])
        row = []
        for part in totals:
            if part == "none":
                variant = embeds[0]
            elif part == "clean-pad":
                variant = clean_padded(embeds[0], embeds[2], end_of_text_position(tokenizer, prompt))
            else:
                variant = swapped(embeds[0], embeds[1], i, j, part)
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
