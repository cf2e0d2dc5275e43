"""What the task vocabulary's UNet draws, against the default embedded model (docs/mini.md).

    python benchmarks/tasks_bars.py --pairs 260 --objects 200

For each model, judged by the world's judge on one image per prompt (fixed seeds):
- colour words: "An image of a <colour> <object>" for seeded (object, colour word) pairs the
  world can draw, every colour word equally often: share drawn on that colour;
- styles: the release's artist prompts with held-out styles, and "An image of Y in the style
  of X": share whose background is the style's colour (emcid/bench/styles.py's probes);
- objects: "An image of Y" for seeded concepts: judge top-1.
"""

from __future__ import annotations

import argparse
import random

import torch


def colour_prompts(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Seeded drawable (object, colour word) prompts, cycling through the colour words."""
    from emcid.mini import styles, world

    rng = random.Random(f"tasks-bars-{seed}")
    concepts = world.load_concepts()
    words = sorted(styles.COLOUR_WORDS)
    prompts, colours = [], []
    while len(prompts) < count:
        word = words[len(prompts) % len(words)]
        concept = concepts[rng.randrange(len(concepts))]
        if styles.can_draw_on(concept, styles.style_colour(word)):
            prompts.append("An image of " + styles.with_article("An image of {}", f"{word} {concept.name}"))
            colours.append(styles.style_colour(word))
    return prompts, colours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=260, help="colour-word prompts")
    parser.add_argument("--styles", type=int, default=40, help="held-out styles probed")
    parser.add_argument("--objects", type=int, default=200, help="concepts for the object top-1")
    parser.add_argument("--models", default="embedded,embedded:tasks",
                        help="comma-separated: 'embedded' (the default), 'embedded:tasks', or folders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench import styles as bench
    from emcid.core.generation import generate_arrays, to_pil
    from emcid.mini import world
    from emcid.mini.judge import load_judge

    judge = load_judge()
    prompts, colours = colour_prompts(args.pairs, args.seed)
    probes = [bench.style_probe(s, args.seed) for s in bench.style_split(args.seed).held_styles[:args.styles]]
    concepts = random.Random(f"tasks-bars-objects-{args.seed}").sample(range(len(world.load_concepts())),
                                                                       args.objects)
    print(f"{'model':<16}{'colour words':>14}{'style alone':>13}{'in a style':>12}{'objects':>10}")
    for name in args.models.split(","):
        bundle = emcid.load_model(None if name == "embedded" else name)
        images = to_pil(generate_arrays(bundle, prompts, list(range(len(prompts))), progress=False))
        colour_hit = (judge.background_proba(images).argmax(1) == torch.tensor(colours)).float().mean()
        found = bench.found_colours(bundle, judge, probes)
        wanted = torch.tensor([p.colour for p in probes])[:, None]
        alone, styled = ((found == wanted)[:, :3].float().mean(), (found == wanted)[:, 3:].float().mean())
        names = [world.load_concepts()[i].name for i in concepts]
        objects = to_pil(generate_arrays(bundle, [f"An image of {n}" for n in names],
                                         list(range(len(concepts))), progress=False))
        top1 = (judge.predict_proba(objects).argmax(1) == torch.tensor(concepts)).float().mean()
        print(f"{name:<16}{colour_hit:>14.3f}{alone:>13.3f}{styled:>12.3f}{top1:>10.3f}")


if __name__ == "__main__":
    main()
