"""Where an ICEB run's holdout cost falls: its holdout concepts split by whether their names
share a token (the model's own tokenizer) with an edited source, each group's mean Holdout
Delta and its share of the run's.

    python benchmarks/holdout_by_token.py runs/iceb_mini [--subtask aice] [--model M]

Reads the ``results.json`` that ``benchmarks/iceb_mini.py`` wrote (every scale of its only
method). "any token": a holdout name shares any token with a source's name; "last token":
its last token is some source's last (the subject token Stage II writes at). No model
weights are run, only the tokenizer is read.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a folder benchmarks/iceb_mini.py wrote")
    parser.add_argument("--subtask", default="aice")
    parser.add_argument("--model", help="pipeline folder (default: the shipped embedded model)")
    args = parser.parse_args()
    import emcid

    results = json.loads((args.run / "results.json").read_text())
    tokenizer = emcid.load_model(args.model).slots()[0].tokenizer

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


if __name__ == "__main__":
    main()
