"""Which prompt tokens does a model's UNet read a concept from? (`emcid.bench.token_probe`)

In the final text conditioning of "A photo of <source>" the probe replaces (a) the subject's
last token, (b) every token after it, by those of "A photo of <destination>", or (c) every
padding state by the empty prompt's, then judges the generated images. Stable Diffusion 1.x
reads the prompt's own tokens and ignores padding: (a) draws the destination and (c) keeps
the source. Bars for the embedded model (docs/mini.md): mean P(destination) >= 0.6 under (a)
and mean P(source) >= 0.9 under (c), over at least 16 random pairs.

    python benchmarks/conditioning_tokens.py [--model M] [--pairs 16] [--images 3]
"""

from __future__ import annotations

import argparse

import emcid
from emcid.bench.judges import load_judge
from emcid.bench.token_probe import probe
from emcid.bench.worlds import world_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundle = emcid.load_model(args.model)
    classes = [c for c in world_for(bundle).classes if not c.holdout_only]
    print(f"model {bundle.source}; P(source) / P(destination) over {args.images} images per pair")
    results, means = probe(bundle, load_judge(bundle), classes, args.pairs, args.images, args.seed)
    for r in results:
        row = ", ".join(f"{part}: {ps:.2f}/{pd:.2f}" for part, (ps, pd) in r.probs.items())
        print(f"{r.source} -> {r.destination}: {row}")
    for part, (p_src, p_dst) in means.items():
        print(f"mean, swapped {part:9s}: P(source) {p_src:.3f}  P(destination) {p_dst:.3f}")


if __name__ == "__main__":
    main()
