"""TIMED's analogue on the embedded world: single colour-word edits (emcid/bench/timed_world.py).

    python benchmarks/timed_mini.py --methods emcid,uce --rows 10 --out runs/timed_mini

Each of ``--rows`` seeded rows edits one ImageNet-1k concept into "<colour word> <concept>"
("tench" -> "teal tench") alone, from the unedited ``embedded:tasks`` model, and reverts it.
The world's judge chooses between the concept's own background and the colour word's on every
image: efficacy on the concept's editing templates, generality on its free-form prompts,
specificity on five concepts of the same shape that must keep their colour. Prints the
unedited model's figures (same prompts and seeds, measured once) and each method's, and writes
``OUT/<method>/results.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from emcid.core.config import parse_option


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="emcid", help="comma-separated editors")
    parser.add_argument("--rows", type=int, default=10, help="single edits built from the world")
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an editor option, e.g. steps=50 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="runs/timed_mini", help="folder for OUT/<method>/results.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.timed_run import format_summary, run_timed

    bundle = emcid.load_model("embedded:tasks")
    options = dict(parse_option(text) for text in args.option)
    for index, method in enumerate(args.methods.split(",")):
        started = time.perf_counter()
        results = run_timed(bundle, method=method, out=Path(args.out) / method, options=options,
                            world_size=args.rows, images=args.images, seed=args.seed,
                            unedited=index == 0, progress=not args.quiet)
        print(f"\n{format_summary(results)}\n({time.perf_counter() - started:.0f} s)")
    print(f"results in {args.out}/<method>/results.json")


if __name__ == "__main__":
    main()
