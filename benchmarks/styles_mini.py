"""Style erasure on the embedded world (the artist task's analogue; emcid/bench/styles.py).

    python benchmarks/styles_mini.py --edits 1,10,100 --out runs/styles_mini

Erases the first N "artists" (world concept names used as styles) towards the world's neutral
concept with the artist task's presets, from the unedited model at every scale (scale 1: each
of the first ``--singles`` styles alone, averaged; grey styles, whose erasure cannot show,
are left out of the figures), and prints
for each N: the share of the erased styles' images that still show the style's colour before
and after, efficacy (the drop), the share drawn on the neutral grey, and the change in the
held-out styles' share and in the judge's top-1 on held-out objects, and the mean image
distance between each image before and after the edit on erased and on held styles
(``--distance judge``, LPIPS's analogue on the world judge's features, or ``lpips`` where
lpips, torchvision and its AlexNet weights are on this machine; docs/quality.md). Runs on
``embedded:tasks`` (the embedded model that draws styles); ``--methods emcid,uce``
compares editors on the same prompts and seeds.
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
    parser.add_argument("--edits", default="1,10,100", help="comma-separated numbers of styles erased")
    parser.add_argument("--methods", default="emcid", help="comma-separated editors")
    parser.add_argument("--model", default="embedded:tasks", help="a model whose world has styles")
    parser.add_argument("--held-styles", type=int, default=100)
    parser.add_argument("--held-objects", type=int, default=100)
    parser.add_argument("--singles", type=int, default=8,
                        help="scale 1 is the mean of this many styles, each erased alone")
    parser.add_argument("--distance", default="judge", choices=["judge", "lpips"],
                        help="image distance before vs after the edit (default: judge)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an editor option, e.g. steps=50 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="runs/styles_mini", help="folder for results.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    try:
        scales = [int(x) for x in args.edits.split(",")]
    except ValueError:
        parser.error(f"--edits takes comma-separated integers, got {args.edits!r}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.styles import format_table, run_style_sweep
    from emcid.mini.judge import load_judge

    bundle = emcid.load_model(args.model)
    if "styles" not in bundle.settings.get("tasks", ()):
        raise SystemExit(f"{args.model} does not draw the world's styles: train one with "
                         "`emcid mini train --task-rate ...` (docs/mini.md) and pass its folder")
    judge = load_judge(str(bundle.device))
    options = dict(parse_option(text) for text in args.option)
    results = {"model_fingerprint": bundle.fingerprint(), "options": options, "distance": args.distance,
               "methods": {}}
    for method in args.methods.split(","):
        started = time.perf_counter()
        try:
            sweep = run_style_sweep(bundle, judge, scales, method, args.seed, args.held_styles,
                                    args.held_objects, args.singles, progress=not args.quiet,
                                    distance=args.distance, **options)
        except emcid.errors.EmcidError as exc:  # a bad setting: one line, before any edit
            raise SystemExit(f"error: {exc}") from None
        seconds = time.perf_counter() - started
        results["methods"][method] = {"scales": sweep, "seconds": seconds}
        print(f"\n{method} ({seconds:.0f} s)\n{format_table(sweep)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
