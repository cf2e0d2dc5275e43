"""ICEB sweep on the embedded miniature model; prints the figures recorded in docs/iceb.md.

    python benchmarks/iceb_mini.py --out runs/iceb_mini

Defaults: AICE and rectification at 1, 10, 100, 300, 1000 edits (the benchmark's full sweep), EMCID
with its release hyperparameters (AICE alpha 0.6), every holdout class scored. Pre-edit
images and Stage I targets are cached ($EMCID_CACHE), so a rerun or a larger sweep reuses
them. ``--model``/``--judge-dir`` point at a development checkpoint instead of the shipped
weights (``--embedded`` marks a checkpoint whose emcid.json lacks ``"world": "mini"``).
``--methods emcid,uce,time,refact,memit`` runs several editors into one report; ``--option
lam=667`` passes an editor option. Uses both cores (``--threads``) and 64 concepts per Stage I
batch on a CPU; ``--device cuda`` runs the model and the judge on a GPU, with as many
concepts per batch as fit (speed only).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from emcid.core.config import parse_option

STAGE1_METHODS = {"emcid", "memit"}  # editors that take Stage I options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/iceb_mini")
    parser.add_argument("--model", help="pipeline folder (default: the shipped embedded model)")
    parser.add_argument("--judge-dir", help="judge folder (default: the shipped judge)")
    parser.add_argument("--embedded", action="store_true", help="treat --model as the embedded world")
    parser.add_argument("--edits", default="1,10,100,300,1000")
    parser.add_argument("--methods", default="emcid",
                        help="comma-separated editors, run one after another into the same --out")
    parser.add_argument("--subtasks", default="aice,rectification")
    parser.add_argument("--holdout-eval", type=int, help="score at most this many holdout classes")
    parser.add_argument("--steps", type=int, help="Stage I steps (release: 200)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an editor option for every method, e.g. lam=667 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--destinations", default="nearest", choices=["nearest", "random"],
                        help="AICE destinations: the 5 nearest holdout classes, or any (far edits)")
    parser.add_argument("--concept-batch", type=int,
                        help="Stage I concepts optimised side by side, at most (speed only; the embedded "
                             "model's default is 64 on a CPU, as many as fit on CUDA)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (our machines have 2 cores)")
    parser.add_argument("--device", default="cpu", help="where the model and the judge run (cpu, cuda)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.iceb import run_iceb
    from emcid.bench.report import summary_table

    bundle = emcid.load_model(args.model, device=args.device)
    if args.embedded:
        bundle.settings["world"] = "mini"
    if not bundle.is_embedded:
        raise SystemExit("this is not the embedded model (install its weights or pass --embedded)")
    judge = None
    if args.judge_dir:
        from emcid.mini.judge import load_judge

        judge = load_judge(args.device, args.judge_dir)
        judge.source = args.judge_dir  # recorded in results.json
    stage1_options = {k: v for k, v in {"concept_batch": args.concept_batch, "steps": args.steps}.items()
                      if v is not None}
    extra = dict(parse_option(text) for text in args.option)
    started = time.perf_counter()
    for method in args.methods.split(","):
        method_started = time.perf_counter()
        results = run_iceb(bundle, method=method, edits=[int(e) for e in args.edits.split(",")],
                           out=args.out, subtasks=args.subtasks.split(","), seed=args.seed, judge=judge,
                           options={**(stage1_options if method in STAGE1_METHODS else {}), **extra},
                           holdout_eval=args.holdout_eval, destinations=args.destinations)
        print(summary_table(results, method))
        print(json.dumps(results["timings"], indent=1))
        for subtask, data in results["subtasks"].items():
            for scale, methods in sorted(data["scales"].items(), key=lambda kv: int(kv[0])):
                if method not in methods:
                    continue
                timings = methods[method]["timings"]
                print(f"{method} {subtask} {scale:>5} edits: edit {timings['edit_s']:.0f} s, "
                      f"post-edit images {timings['post_images_s']:.0f} s")
        print(f"{method}: {time.perf_counter() - method_started:.0f} s")
    print(f"total {time.perf_counter() - started:.0f} s; results in {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
