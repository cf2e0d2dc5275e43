"""Debiasing on the embedded world: balance N concepts over two background colour words.

    python benchmarks/debias_mini.py --concepts 10 --out runs/debias_mini

Each concept is one the world draws on a colour that has a colour word ("An image of a
tench" always shows that colour: a share of 1.00 / 0.00); its values are that word and a
second, seeded colour word it can be drawn on. EMCID's debias task (Stage I per value,
factors tuned by generating and judging, the release's budget and stop rule) then makes each
concept draw both. Prints the per-concept before/after shares measured by the world's judge
and the mean distance from an even split before and after. Runs on ``embedded:tasks``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from emcid.core.config import parse_option


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--model", default="embedded:tasks")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an EMCID or tuning option, e.g. images=25 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/debias_mini")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.styles import colour_debias_requests
    from emcid.tasks.debias import balance_gap, format_report

    bundle = emcid.load_model(args.model)
    requests = colour_debias_requests(args.concepts, args.seed)
    options = dict(parse_option(text) for text in args.option)
    started = time.perf_counter()
    patch = emcid.edit(bundle, requests, progress=not args.quiet, **options)
    seconds = time.perf_counter() - started
    reports = patch.metadata["debias"]
    gaps = {key: sum(balance_gap(r[key]) for r in reports) / len(reports) for key in ("before", "after")}
    print(format_report(reports))
    print(f"mean distance from an even split: before {gaps['before']:.3f}, after {gaps['after']:.3f}; "
          f"{seconds:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"options": options, "reports": reports, "gaps": gaps,
                                                  "seconds": seconds}, indent=2))
    patch.save(out / "debias.safetensors")


if __name__ == "__main__":
    main()
