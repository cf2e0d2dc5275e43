"""Write the embedded world's statistics captions without those that name any name (aliases
too) of the first N AICE sources: the corpus file of docs/iceb.md's 1,000-edit row whose
statistics leave out every name of an edited concept, not only the request's source.

    python benchmarks/corpus_without_sources.py --edits 1000 --out runs/corpus_without_sources.txt
    python benchmarks/iceb_mini.py --subtasks aice --edits 1000 --steps 50 --holdout-eval 250 \\
        --option lam=64000 --option corpus=runs/corpus_without_sources.txt

The sources are ICEB's (seed 0: its split and order); the captions are the embedded model's
default ``--samples`` (5,000).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from emcid.bench.selection import split_classes
    from emcid.bench.worlds import mini_world
    from emcid.core.stats import captions_without
    from emcid.mini.world import caption_corpus

    pool, _ = split_classes(mini_world().classes, args.seed, 0.5)
    names = [name for cls in pool[:args.edits] for name in cls.names]
    captions = caption_corpus(args.samples)
    kept = captions_without(captions, names)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(kept) + "\n")
    print(f"{len(kept)} of {len(captions)} captions name none of the {len(names)} names; "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
