"""Command lines of the task benchmarks: ``emcid bench artists`` and ``emcid bench professions``.

Argument parsing only; each command is one library call (:func:`emcid.bench.artists.run_artists`,
:func:`emcid.bench.professions.run_professions`). :func:`emcid.bench.cli.register` adds them.
"""

from __future__ import annotations

import argparse

from .cli_flags import add_model_flags


def _common(parser: argparse.ArgumentParser, images_help: str, option_help: str) -> None:
    """The arguments both commands share."""
    parser.add_argument("--model", help="diffusers folder or hub id (default: the embedded world's analogue "
                                        "on embedded:tasks)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help=option_help)
    parser.add_argument("--clip", "--judge", dest="clip",
                        help="CLIP folder or cached hub id (never downloaded)")
    parser.add_argument("--images", type=int, help=images_help)
    parser.add_argument("--seed", type=int, default=0, help="first image seed (image k: seed + k)")
    parser.add_argument("--out", required=True, help="folder for results.json")
    add_model_flags(parser)


def cmd_artists(args: argparse.Namespace) -> None:
    """``emcid bench artists``: LPIPS (and CLIP score) before vs after erasing artists."""
    from ..core.config import parse_option
    from .artists import format_summary, run_artists

    settings = {k: v for k, v in {"images": args.images, "held": args.held}.items() if v is not None}
    results = run_artists(args.model, args.artists, args.erase, args.erase_list, args.method, args.out,
                          clip=args.clip, distance=args.distance, device=args.device, dtype=args.dtype,
                          options=dict(parse_option(text) for text in args.option),
                          allow_pickle=args.allow_pickle, seed=args.seed, **settings)
    print(format_summary(results))
    print(f"wrote {args.out}/results.json")


def add_artists(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("artists", help="artist erasure: LPIPS before vs after on erased and held "
                                                 "artists, CLIP score with --clip (the embedded world: the "
                                                 "style benchmark)")
    _common(parser, "images per prompt, seeds --seed .. --seed + N - 1 (default 4; not on the embedded "
                    "world, which draws one per prompt)", "an editor option, e.g. steps=100 (repeatable)")
    parser.add_argument("--artists", help="artist list: a CSV file with an artist column (and optionally "
                                          "prompt), or a text file, one name a line")
    parser.add_argument("--erase", type=int, help="erase the first N artists")
    parser.add_argument("--erase-list", nargs="+", metavar="NAME", help="erase these artists of the list")
    parser.add_argument("--held", type=int, help="at most this many held artists (default: the rest of "
                                                 "the list; the embedded world: 100 styles and objects)")
    parser.add_argument("--method", default="emcid", help="editing method (default: emcid)")
    parser.add_argument("--distance", choices=["lpips", "judge"],
                        help="image distance before vs after: lpips (needs lpips, torchvision and its "
                             "AlexNet weights; the default on Stable Diffusion) or judge (its analogue "
                             "on the world's judge; the embedded world's default)")
    parser.set_defaults(func=cmd_artists)


def cmd_professions(args: argparse.Namespace) -> None:
    """``emcid bench professions``: attribute shares before vs after debiasing professions."""
    from ..core.config import parse_option
    from .professions import format_summary, run_professions

    options = dict(parse_option(text) for text in args.option)
    if args.tolerance is not None:
        options["tolerance"] = args.tolerance  # the flag wins over --option
    settings = {k: v for k, v in {"images": args.images, "concepts": args.concepts}.items() if v is not None}
    results = run_professions(args.model, args.professions, args.attributes, args.clip, args.out,
                              options=options, device=args.device, dtype=args.dtype,
                              allow_pickle=args.allow_pickle, seed=args.seed, **settings)
    print(format_summary(results))
    print(f"wrote {args.out}/results.json")


def add_professions(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("professions", help="gender debiasing over professions, judged by zero-shot "
                                                     "CLIP (the embedded world: colour-word debias)")
    _common(parser, "evaluation images per prompt, seeds --seed .. --seed + N - 1 (default 8)",
            "an EMCID or debias tuning option, e.g. steps=100, images=25 (tuning images per round), "
            "rounds=10 (repeatable)")
    parser.add_argument("--professions", help="a CSV file with a profession column (and optionally prompt), "
                                              "or a text file, one a line")
    parser.add_argument("--attributes", nargs="+", metavar="VALUE",
                        help="attribute values to balance (default: male female)")
    parser.add_argument("--tolerance", "--threshold", dest="tolerance", type=float,
                        help="debias stop rule: every share within this of even, in [0, 1] (default 0.02)")
    parser.add_argument("--concepts", type=int, help="the embedded world: concepts debiased (default 10)")
    parser.set_defaults(func=cmd_professions)
