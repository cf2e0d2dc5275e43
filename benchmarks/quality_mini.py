"""General quality after many edits on the embedded model (emcid/bench/coco.py; docs/quality.md).

    python benchmarks/quality_mini.py --edits 100 --captions 1000 --out runs/quality_mini

Makes the first N AICE edits of ICEB (its split, order and nearest destinations), draws
``--captions`` held-out free-form prompts of concepts no edit touches with the unedited and the
edited model (same seeds), and prints the judge's top-1 on them before and after and the FID
between the two image sets on the judge's features. ``--methods emcid,uce`` compares editors
on the same captions and seeds; each method's results.json goes to ``OUT/<method>/``.
"""

from __future__ import annotations

import argparse
import logging

import torch

from emcid.core.config import parse_option


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=100, help="ICEB AICE edits made together")
    parser.add_argument("--captions", type=int, default=1000, help="held-out captions, one image each")
    parser.add_argument("--methods", default="emcid", help="comma-separated editors")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an editor option, e.g. steps=50 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/quality_mini", help="folder for the results")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from emcid.bench.coco import format_summary, run_coco

    options = dict(parse_option(text) for text in args.option)
    for method in args.methods.split(","):
        results = run_coco(method=method, out=f"{args.out}/{method}", options=options, device=args.device,
                           captions=args.captions, edits=args.edits, seed=args.seed,
                           progress=not args.quiet)
        print(f"\n{format_summary(results)} ({results['timings']['total_s']:.0f} s)")
    print(f"results in {args.out}/<method>/results.json")


if __name__ == "__main__":
    main()
