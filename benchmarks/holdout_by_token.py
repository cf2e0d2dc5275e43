"""Where an ICEB run's holdout cost falls: its holdout concepts split by whether their names
share a token (the model's own tokenizer) with an edited source, each group's mean Holdout
Delta and its share of the run's.

    python benchmarks/holdout_by_token.py runs/iceb_mini [--subtask aice] [--model M] [--worst 12]

Reads the ``results.json`` that ``benchmarks/iceb_mini.py`` wrote (every scale of its only
method). "any token": a holdout name shares any token with a source's name; "last token":
its last token is some source's last (the subject token Stage II writes at). Then the
holdout concepts that are some edit's destination against the others, and the
``--worst`` holdout concepts that lost most and their share of the run's Holdout Delta (is
the cost spread thin or a few collisions?). With ``--captions``, per scale, how many of the
default statistics captions that name no source (what ``C`` is made of) share any word piece
with a source (``neighbour_weight``'s captions) and how many hold a source's last word piece.
No model weights are run, only the tokenizer is read.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def split_by_token(per_class: dict[str, float], sources: list[str], tokens) -> list[tuple]:
    """(rule, n sharing, their mean, their share of the mean, n other, their mean) per rule."""
    ids = {name: tokens(name) for name in [*per_class, *sources]}
    any_source = set().union(*(ids[s] for s in sources))
    last_source = {ids[s][-1] for s in sources}
    rules = {"any token": lambda n: bool(set(ids[n]) & any_source),
             "last token": lambda n: ids[n][-1] in last_source}
    rows = []
    for rule, shares in rules.items():
        sharing = [v for n, v in per_class.items() if shares(n)]
        other = [v for n, v in per_class.items() if not shares(n)]
        rows.append((rule, len(sharing), sum(sharing) / max(len(sharing), 1),
                     sum(sharing) / len(per_class), len(other), sum(other) / max(len(other), 1)))
    return rows


def worst(per_class: dict[str, float], count: int) -> tuple[list[tuple[str, float]], float]:
    """The ``count`` concepts that lost most, and their sum's share of the mean over all."""
    ranked = sorted(per_class.items(), key=lambda item: item[1])[:count]
    return ranked, sum(value for _, value in ranked) / len(per_class)


def caption_shares(bundle, sources: list[str]) -> tuple[int, int, int]:
    """(kept captions, those sharing any word piece with a source, those holding a source's
    last word piece): pieces in more than 2 % of the captions left out, as the statistics do."""
    from emcid.core.stats import default_corpus, neighbour_captions, split_captions
    from emcid.editors import get_editor

    samples = get_editor("emcid", bundle).config.stats_samples  # the model's default corpus size
    kept, _ = split_captions(default_corpus(bundle, samples), sources)
    tokenizer = bundle.slots()[0].tokenizer
    pieces = [set(ids) for ids in tokenizer(kept, add_special_tokens=False)["input_ids"]]
    counts = Counter(piece for found in pieces for piece in found)
    last = {ids[-1] for ids in tokenizer(sources, add_special_tokens=False)["input_ids"]
            if counts[ids[-1]] <= max(0.02 * len(kept), 1)}
    return len(kept), len(neighbour_captions(bundle, kept, sources)), sum(bool(f & last) for f in pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a folder benchmarks/iceb_mini.py wrote")
    parser.add_argument("--subtask", default="aice")
    parser.add_argument("--model", help="pipeline folder (default: the shipped embedded model)")
    parser.add_argument("--worst", type=int, default=12, help="list this many most-damaged concepts")
    parser.add_argument("--captions", action="store_true",
                        help="also count the statistics captions near the sources")
    args = parser.parse_args()
    import emcid

    results = json.loads((args.run / "results.json").read_text())
    bundle = emcid.load_model(args.model)
    tokenizer = bundle.slots()[0].tokenizer

    def tokens(name: str) -> list[int]:
        return tokenizer(name, add_special_tokens=False)["input_ids"]

    subtask = results["subtasks"][args.subtask]
    print(f"{'edits':>6} {'rule':<11} {'sharing':>8} {'mean':>8} {'of HD':>8} {'other':>6} {'mean':>8}")
    for scale, methods in subtask["scales"].items():
        (figures,) = methods.values()
        sources = [edit["source"] for edit in subtask["edits"][:int(scale)]]
        for rule, n, mean, share, n_other, other in split_by_token(
                figures["per_class"]["holdout_delta"], sources, tokens):
            print(f"{scale:>6} {rule:<11} {n:>8} {mean:>+8.4f} {share:>+8.4f} {n_other:>6} {other:>+8.4f}")
    for scale, methods in subtask["scales"].items():
        (figures,) = methods.values()
        per_class = figures["per_class"]["holdout_delta"]
        destinations = {edit["destination"] for edit in subtask["edits"][:int(scale)]}
        held = [value for name, value in per_class.items() if name in destinations]
        other = [value for name, value in per_class.items() if name not in destinations]
        print(f"{scale} edits: {len(held)} holdout concepts are an edit's destination, mean "
              f"{sum(held) / max(len(held), 1):+.4f}; the other {len(other)}, mean "
              f"{sum(other) / max(len(other), 1):+.4f}")
        ranked, share = worst(per_class, args.worst)
        print(f"{scale} edits, the {len(ranked)} of {len(per_class)} holdout concepts that lost most "
              f"({share:+.4f} of Holdout Delta {sum(per_class.values()) / len(per_class):+.4f}): "
              + ", ".join(f"{name} {value:+.2f}" for name, value in ranked))
        if args.captions:
            kept, any_piece, last_piece = caption_shares(
                bundle, [edit["source"] for edit in subtask["edits"][:int(scale)]])
            print(f"{scale} edits: of {kept} statistics captions naming no source, {any_piece} share a "
                  f"word piece with one, {last_piece} hold a source's last word piece")


if __name__ == "__main__":
    main()
