"""Command-line entry points of the benchmarks: ``emcid bench iceb|timed|road|coco|i2p|artists|professions``
and ``emcid demo``.

Argument parsing only; each command is one library call. The main CLI calls
:func:`register` with its subparsers.
"""

from __future__ import annotations

import argparse

from .cli_flags import DTYPE_HELP, add_model_flags
from .cli_tasks import add_artists, add_professions
from .i2p_cli import add_i2p


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def cmd_iceb(args: argparse.Namespace) -> None:
    from ..cli_commands import editor_options
    from .iceb import run_iceb
    from .report import summary_table

    options = editor_options(args, {"steps": args.steps, "lam": args.lam, "alpha": args.alpha,
                                    "stats_samples": args.stats_samples, "precision": args.precision,
                                    "stop_tolerance": args.stop_tolerance})
    options.pop("cache", None)  # --no-cache is the run's switch: it reaches the editor's caches too
    settings = {k: v for k, v in {"holdout_eval": args.holdout_eval, "min_pre_score": args.min_pre_score,
                                  "reference_dir": args.reference_dir,
                                  "destinations": args.destinations}.items() if v is not None}
    if args.no_cache:
        settings["cache"] = False
    results = run_iceb(args.model, method=args.method, edits=args.edits, out=args.out,
                       subtasks=args.subtasks, seed=args.seed, device=args.device, judge=args.judge,
                       options=options, allow_pickle=args.allow_pickle, dtype=args.dtype, **settings)
    print(summary_table(results, args.method))
    print(f"wrote {args.out}/results.json and {args.out}/report.html")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from exc


def cmd_single(args: argparse.Namespace) -> None:
    """``emcid bench timed`` and ``emcid bench road``: single edits scored row by row."""
    from ..core.config import parse_option
    from ..errors import BenchmarkError
    from .timed_run import format_summary, run_timed
    from .timed_world import DEFAULT_ROWS

    rows = getattr(args, "rows", None)
    if rows is not None and args.data is not None:
        raise BenchmarkError("--rows sets how many rows are built from the embedded world; with "
                             "--data every row of the file runs")
    results = run_timed(args.model, args.data, args.benchmark, args.method, args.out, judge=args.judge,
                        options=dict(parse_option(text) for text in args.option),
                        world_size=rows or DEFAULT_ROWS, device=args.device, dtype=args.dtype,
                        allow_pickle=args.allow_pickle, images=args.images, seed=args.seed,
                        thresholds=args.thresholds, unedited=not args.no_unedited)
    print(format_summary(results))
    print(f"wrote {args.out}/results.json")


def _add_single_edit(commands: argparse._SubParsersAction, name: str,
                     help_text: str) -> argparse.ArgumentParser:
    """The arguments ``timed`` and ``road`` share."""
    from .timed import DEFAULT_THRESHOLDS

    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("--model", help="diffusers folder or hub id (with --data; default without it: "
                                        "embedded:tasks)")
    parser.add_argument("--method", default="emcid", help="editing method (default: emcid)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an editor option, e.g. steps=100 (repeatable)")
    parser.add_argument("--images", type=int, default=4,
                        help="images per prompt, seeds --seed .. --seed + N - 1 (default 4; TIMED: 24)")
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--seed", type=int, default=0,
                        help="first image seed; also the requests' and the world rows' seed")
    parser.add_argument("--judge", help="CLIP folder or cached hub id (default: "
                                        "openai/clip-vit-large-patch14; never downloaded)")
    parser.add_argument("--thresholds", type=_floats, default=DEFAULT_THRESHOLDS,
                        help="extra generality figures: share of positive images with P(destination) "
                             "above each, in [0, 1] (default: 0.75,0.9, as ReFACT)")
    parser.add_argument("--no-unedited", action="store_true",
                        help="skip the unedited model's figures on the same prompts and seeds")
    add_model_flags(parser)
    parser.set_defaults(func=cmd_single)
    return parser


def cmd_coco(args: argparse.Namespace) -> None:
    """``emcid bench coco``: FID and CLIP score (the world: FID and judge top-1) after an edit."""
    from ..core.config import parse_option
    from .coco import format_summary, run_coco

    results = run_coco(args.model, args.captions, args.requests, args.method, args.out, judge=args.judge,
                       options=dict(parse_option(text) for text in args.option), device=args.device,
                       captions=args.images, edits=args.edits, seed=args.seed)
    print(format_summary(results))
    print(f"wrote {args.out}/results.json")


def _add_coco(commands: argparse._SubParsersAction) -> None:
    coco = commands.add_parser("coco", help="general quality after an edit: FID and CLIP score on COCO "
                                            "captions (the embedded world: FID and judge top-1)")
    coco.add_argument("--model", help="diffusers folder or hub id (default: the embedded model)")
    coco.add_argument("--captions", help="COCO captions file (captions_val2017.json) or another caption "
                                         "file; not on the embedded model, which draws its own")
    coco.add_argument("--requests", help="request file of the edit (default on the embedded model: "
                                         "the first --edits ICEB AICE edits)")
    coco.add_argument("--edits", type=int, default=10,
                      help="ICEB AICE edits on the embedded model (default 10)")
    coco.add_argument("--method", default="emcid", help="editing method (default: emcid)")
    coco.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="an editor option, e.g. steps=100 (repeatable)")
    coco.add_argument("--images", type=int, default=100,
                      help="captions drawn, one image each per model, seeds --seed + k (default 100)")
    coco.add_argument("--seed", type=int, default=0, help="caption choice, first image seed, world edits")
    coco.add_argument("--judge", help="CLIP folder or cached hub id (default: openai/clip-vit-large-patch14; "
                                      "never downloaded)")
    coco.add_argument("--out", required=True, help="folder for results.json")
    coco.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    coco.set_defaults(func=cmd_coco)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    from .report import summary_table

    results = run_demo(args.out, device=args.device)
    print(summary_table(results))
    print(f"wrote {args.out}/results.json and {args.out}/report.html "
          f"({results['timings']['total_s']:.0f} s)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` (with ``iceb``, ``timed``, ``road``, ``coco``, ``i2p``, ``artists`` and
    ``professions``) and ``demo`` to the main parser's subcommands."""
    from .iceb import DEFAULT_SCALES, SUBTASKS

    bench = subparsers.add_parser("bench", help="run a benchmark")
    commands = bench.add_subparsers(dest="benchmark", required=True)
    iceb = commands.add_parser("iceb", help="ImageNet Concept Editing Benchmark (AICE, rectification)")
    iceb.add_argument("--model", help="diffusers folder or hub id (default: the embedded model)")
    iceb.add_argument("--method", default="emcid", help="editing method (default: emcid)")
    iceb.add_argument("--config", help="YAML or JSON file of editor options (flags win over it)")
    iceb.add_argument("--edits", type=_ints, default=DEFAULT_SCALES,
                      help="numbers of edits, e.g. 1,10,100 (default: 1,10,50,100,300,1000, capped)")
    iceb.add_argument("--out", required=True, help="folder for results.json and report.html")
    iceb.add_argument("--subtasks", type=_names, default=SUBTASKS, help="aice,rectification (default: both)")
    iceb.add_argument("--seed", type=int, default=0, help="split, order and destination seed")
    iceb.add_argument("--destinations", choices=["nearest", "random"],
                      help="AICE destinations: among the 5 nearest holdout classes (nearest, the "
                           "paper's protocol, default) or any holdout class (random: far edits)")
    iceb.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    iceb.add_argument("--weights-dtype", "--dtype", dest="dtype", default="float32",
                      choices=["float32", "float16", "bfloat16"], help=DTYPE_HELP)
    iceb.add_argument("--judge", help="ViT classifier folder or hub id, or 'mini' (default: from the model)")
    iceb.add_argument("--holdout-eval", type=int, help="score at most this many holdout classes")
    iceb.add_argument("--min-pre-score", type=float,
                      help="keep only classes the unedited model draws with P(own) >= this")
    iceb.add_argument("--reference-dir", help="real images of undrawable classes: DIR/<synset>/*.jpg")
    iceb.add_argument("--steps", type=int, help="EMCID Stage I steps (release: 200)")
    iceb.add_argument("--stop-tolerance", type=float,
                      help="EMCID Stage I stopping rule, e.g. 0.1 (0, default: every concept runs --steps)")
    iceb.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                      help="EMCID Stage I UNet autocast, as `emcid edit --precision` (default: auto)")
    iceb.add_argument("--lam", type=float, help="EMCID preservation weight (release: 4000)")
    iceb.add_argument("--alpha", type=float, help="EMCID editing strength (AICE release: 0.6)")
    iceb.add_argument("--stats-samples", type=int, help="captions for the statistics (release: 100,000; "
                                                             "the embedded model sets 5,000)")
    iceb.add_argument("--no-cache", action="store_true", help="regenerate everything")
    iceb.add_argument("--allow-pickle", action="store_true",
                      help="allow .bin/.ckpt checkpoints (they can run code when loaded)")
    iceb.set_defaults(func=cmd_iceb)

    timed = _add_single_edit(commands, "timed", "TIMED single edits (a TIMED CSV file), or without "
                                                "--data their analogue on the embedded world")
    timed.add_argument("--data", help="TIMED CSV file (old, new, positive<k>, gt<k>, negative<k>, gn<k>); "
                                      "without it: colour-word edits built from the embedded world")
    timed.add_argument("--rows", type=int, help="rows built from the embedded world (default 10)")
    road = _add_single_edit(commands, "road", "RoAD single edits (a RoAD CSV file, as ReFACT's)")
    road.add_argument("--data", required=True,
                      help="RoAD CSV file (prompt, old, new, positive<k>, positive_old<k>, "
                           "positive_new<k>, negative<k>, negative_new<k>)")

    _add_coco(commands)
    add_i2p(commands)
    add_artists(commands)
    add_professions(commands)

    demo = subparsers.add_parser("demo", help="edit a few dozen classes of the embedded model and report")
    demo.add_argument("--out", default="emcid-demo", help="report folder (default: ./emcid-demo)")
    demo.add_argument("--device", default="cpu", help="torch device")
    demo.set_defaults(func=cmd_demo)
