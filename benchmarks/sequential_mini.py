"""Sequential edits on the embedded model: N batches of M edits, one after another, versus
one batch of N*M edits (by default 10 sequential batches of 100 against one batch of 1,000).

    python benchmarks/sequential_mini.py                      # N=10, M=100 (hours on a CPU)
    python benchmarks/sequential_mini.py --batches 3 --batch-size 5 --holdout-eval 20 --steps 50

Each sequential batch is edited on the model carrying the earlier batches' patches and applied
on top, with the chain handled as ``earlier_edits`` says (``--option earlier_edits=hold``:
Stage I on that model, the earlier keys held; the default ``replay``: the chain's requests
solved again with the batch's, on the base model). Both runs use the same
AICE edits (ICEB's split, destinations among the 5 nearest holdout classes, alpha 0.6) and
are scored with ICEB's metrics on the same prompts and seeds: Source Forget and Source2Dest
of the first batch's edits and of all edits, and Holdout Delta, all measured at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from emcid.core.config import parse_option

AICE_OPTIONS = {"alpha": 0.6}  # ICEB's release value for arbitrary edits
FIGURES = ("source_forget_efficacy", "source2dest_efficacy", "source_forget_generalization",
           "source2dest_generalization", "holdout_delta")


def aice_items(bundle, world, bank, count: int, seed: int, holdout_eval: int | None):
    """``count`` AICE edits (ICEB's seeded order and destinations) and the holdout groups."""
    from emcid.bench import scoring, selection
    from emcid.requests import EditRequest

    pool, holdout = selection.split_classes(world.classes, seed, 0.5)
    if len(pool) < count:
        raise SystemExit(f"{count} edits asked for, but the world has {len(pool)} editable classes")
    chosen = pool[:count]
    destinations = selection.choose_destinations(chosen, holdout, selection.class_embeddings(bundle, chosen),
                                            selection.class_embeddings(bundle, holdout), seed)
    by_index = {c.index: c for c in world.classes}
    items = []
    for cls in chosen:
        dst = by_index[destinations[cls.index]]
        items.append(scoring.EditItem(
            EditRequest(cls.name, dst.name, world.templates, seed=seed), cls.index, dst.index,
            scoring.template_group(bank, world, cls, cls.name, cls.name, cls.index, dst.index),
            scoring.free_form_group(bank, cls, cls.name, cls.name, cls.index, dst.index), []))
    if holdout_eval is not None and len(holdout) > holdout_eval:
        holdout = sorted(random.Random(f"iceb-holdout-{seed}").sample(holdout, holdout_eval),
                         key=lambda c: c.index)
    groups = [scoring.template_group(bank, world, c, c.name, c.name, c.index) for c in holdout]
    return items, groups


def score(scorer, items, batch_size: int, holdout) -> dict:
    """ICEB figures of the model as it is now: the first batch's edits, all edits, holdout."""
    from emcid.bench.scoring import scale_metrics

    rows = [r for i in items for r in i.rows()] + [r for g in holdout for r in g.rows]
    post = scorer.post(rows, None)
    first = scale_metrics(scorer.pre, post, items[:batch_size], holdout)
    every = scale_metrics(scorer.pre, post, items, holdout)
    return {"first_batch": {k: first[k] for k in FIGURES},
            "all_edits": {k: every[k] for k in FIGURES}}


def run(bundle, scorer, items, batches: int, batch_size: int, holdout, options: dict,
        progress: bool) -> dict:
    """Edit ``batches`` batches one after another (or one batch), score, revert everything."""
    import emcid

    base = bundle.fingerprint()
    size = len(items) // batches
    patches, seconds = [], []
    for start in range(0, len(items), size):
        started = time.perf_counter()
        patch = emcid.edit(bundle, [i.request for i in items[start:start + size]], "emcid",
                           progress=progress, **options)
        seconds.append(time.perf_counter() - started)
        patch.apply(bundle)
        patches.append(patch)
    started = time.perf_counter()
    result = score(scorer, items, batch_size, holdout)
    result["timings"] = {"edit_s": seconds, "score_s": time.perf_counter() - started}
    for patch in reversed(patches):
        patch.revert(bundle)
    if bundle.fingerprint() != base:
        raise RuntimeError("the model was not restored after the edits")
    return result


def table(results: dict, batches: int, batch_size: int) -> str:
    names = {"source_forget_efficacy": "Forget eff.", "source2dest_efficacy": "S2D eff.",
             "source_forget_generalization": "Forget gen.", "source2dest_generalization": "S2D gen.",
             "holdout_delta": "Holdout D"}
    head = f"{'run':<28}{'edits scored':<14}" + "".join(f"{n:>13}" for n in names.values())
    lines = [head, "-" * len(head)]
    labels = {name: label for name, label in (
        ("sequential", f"sequential {batches} x {batch_size}"),
        ("one_batch", f"one batch of {batches * batch_size}")) if name in results}
    for run_name, label in labels.items():
        for part, what in (("first_batch", f"first {batch_size}"), ("all_edits", "all")):
            values = results[run_name][part]
            lines.append(f"{label:<28}{what:<14}" + "".join(
                f"{values[k]:>+13.3f}" if values[k] is not None else f"{'-':>13}" for k in names))
    for run_name, label in labels.items():
        timings = results[run_name]["timings"]
        edits = ", ".join(f"{s:.0f}" for s in timings["edit_s"])
        lines.append(f"{label}: edit {sum(timings['edit_s']):.0f} s ({edits}), "
                     f"post-edit images {timings['score_s']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10, help="N sequential batches")
    parser.add_argument("--batch-size", type=int, default=100, help="M edits per batch")
    parser.add_argument("--holdout-eval", type=int, help="score at most this many holdout classes")
    parser.add_argument("--steps", type=int, help="Stage I steps (release: 200)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an EMCID option, e.g. stats_samples=5000 (repeatable)")
    parser.add_argument("--model", help="pipeline folder (default: the shipped embedded model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sequential_mini", help="folder for results.json")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--sequential-only", action="store_true",
                        help="skip the one batch of N*M (when its figures are known from an earlier run)")
    args = parser.parse_args()
    if args.batches < 1 or args.batch_size < 1:
        parser.error("--batches and --batch-size must be at least 1")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    import emcid
    from emcid.bench.judges import load_judge
    from emcid.bench.scoring import ImageBank, Scorer
    from emcid.bench.worlds import world_for
    from emcid.core.cache import TensorCache

    started = time.perf_counter()
    bundle = emcid.load_model(args.model)
    if not bundle.is_embedded:
        raise SystemExit("this is not the embedded model (install its weights)")
    world, bank = world_for(bundle), ImageBank()
    scorer = Scorer(bundle, load_judge(bundle), bank, TensorCache("images"), progress=not args.quiet)
    items, holdout = aice_items(bundle, world, bank, args.batches * args.batch_size, args.seed,
                                args.holdout_eval)
    scorer.ensure_pre()
    options = {**AICE_OPTIONS, **({"steps": args.steps} if args.steps else {}),
               **dict(parse_option(text) for text in args.option)}
    results = {"batches": args.batches, "batch_size": args.batch_size, "options": options,
               "holdout_scored": [g.key for g in holdout], "model_fingerprint": bundle.fingerprint()}
    runs = [("sequential", args.batches)] if args.sequential_only else [("sequential", args.batches),
                                                                        ("one_batch", 1)]
    for name, batches in runs:
        results[name] = run(bundle, scorer, items, batches, args.batch_size, holdout, options,
                            not args.quiet)
    results["total_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results, args.batches, args.batch_size))
    print(f"total {results['total_s']:.0f} s (pre-edit images {scorer.pre_seconds:.0f} s); "
          f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
