"""Far edits as a user makes them: P(source) and P(destination) per prompt, after a full edit.

Edits the given pairs (default: the README's, tench -> goldfish and volcano -> beacon) into
the embedded model in one call of ``emcid.edit`` at its defaults, then judges images of each
prompt (the editing templates, prompts a user would write, and the world's held-out
free-form prompts) before and after, and P(own class) of unrelated concepts. Targets:
templates P(destination) >= 0.8, free-form >= 0.6, P(source) <= 0.05, unrelated P(own) >= 0.9.

    python benchmarks/far_edits.py [--pairs tench:goldfish,volcano:beacon] [--images 4]
        [--option init=zero] [--unrelated 20]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

USER_PROMPTS = ("a photo of a {}", "there is a {}", "{} on a table", "a picture of {} in the park")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="tench:goldfish,volcano:beacon")
    parser.add_argument("--images", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--unrelated", type=int, default=20, help="unrelated concepts scored")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an editor option, e.g. init=zero for the release's Stage I start")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.judges import load_judge
    from emcid.bench.worlds import world_for
    from emcid.config import parse_option
    from emcid.generation import generate

    bundle = emcid.load_model()
    judge, world = load_judge(bundle), world_for(bundle)
    by_name = {name: c for c in world.classes for name in c.names}  # aliases too ("monkey dog")
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    options = dict(parse_option(text) for text in args.option)
    edited = {by_name[n].index for pair in pairs for n in pair}
    others = random.Random(0).sample([c for c in world.classes if c.index not in edited], args.unrelated)

    def score(prompts: list[str], indices: list[int]) -> list[float]:
        seeds = [5000 + k for k in range(args.images)]
        images = generate(bundle, [p for p in prompts for _ in seeds], seeds * len(prompts), progress=False)
        probs = judge.predict_proba(images).view(len(prompts), len(seeds), -1).mean(1)
        return [float(probs[i, j]) for i, j in enumerate(indices)]

    def measure() -> tuple[dict, float]:
        table = {}
        for src, dst in pairs:
            groups = {"templates": list(world.templates), "user": list(USER_PROMPTS),
                      "free-form": [t for t, _ in by_name[src].free_form][:5]}
            for group, templates in groups.items():
                prompts = [t.format(src) for t in templates]
                p_src = score(prompts, [by_name[src].index] * len(prompts))
                p_dst = score(prompts, [by_name[dst].index] * len(prompts))
                table[(src, dst, group)] = list(zip(prompts, p_src, p_dst))
        own = score([f"An image of {c.name}" for c in others], [c.index for c in others])
        return table, sum(own) / len(own)

    before, own_before = measure()
    started = time.perf_counter()
    patch = emcid.edit(bundle, [emcid.EditRequest(s, d) for s, d in pairs], progress=False, **options)
    edit_s = time.perf_counter() - started
    patch.apply(bundle)
    after, own_after = measure()
    print(f"embedded model, options {options or 'defaults'}; {args.images} images per prompt; "
          f"edit {edit_s:.0f} s")
    print("| pair | prompts | prompt | P(source) before -> after | P(destination) before -> after |")
    print("| --- | --- | --- | --- | --- |")
    for key, rows in after.items():
        for (prompt, p_src, p_dst), (_, b_src, b_dst) in zip(rows, before[key]):
            print(f"| {key[0]} -> {key[1]} | {key[2]} | {prompt} | {b_src:.2f} -> {p_src:.2f} | "
                  f"{b_dst:.2f} -> {p_dst:.2f} |")
    print("\nmeans after the edit:")
    for key, rows in after.items():
        print(f"  {key[0]} -> {key[1]}, {key[2]}: P(source) {sum(r[1] for r in rows) / len(rows):.3f}, "
              f"P(destination) {sum(r[2] for r in rows) / len(rows):.3f}")
    print(f"  {len(others)} unrelated concepts, P(own): {own_before:.3f} -> {own_after:.3f}")


if __name__ == "__main__":
    main()
