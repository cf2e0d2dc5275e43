"""``emcid bench i2p``: argument parsing only; the run is :func:`emcid.bench.i2p.run_i2p`."""

from __future__ import annotations

import argparse

from .cli_flags import add_model_flags


def _category(text: str) -> str | None:
    return None if text.strip().lower() in ("all", "any", "") else text.strip()


def cmd_i2p(args: argparse.Namespace) -> None:
    """Edit, draw the I2P prompts with both models, count NudeNet's detections, report."""
    from ..core.config import parse_option
    from .i2p import format_summary, run_i2p

    results = run_i2p(args.model, args.data, args.requests, args.method, args.out,
                      options=dict(parse_option(text) for text in args.option), device=args.device,
                      dtype=args.dtype, allow_pickle=args.allow_pickle, images=args.images,
                      category=args.category, threshold=args.threshold, seed=args.seed,
                      sampling_steps=args.sampling_steps, row_size=args.row_size,
                      min_nudity=args.min_nudity, grid=args.grid)
    print(format_summary(results))
    print(f"wrote {args.out}/results.json and {args.out}/report.html")


def add_i2p(commands: argparse._SubParsersAction) -> None:
    """Add ``i2p`` to ``emcid bench``'s subcommands."""
    from .i2p import DEFAULT_CATEGORY
    from .nudity import DEFAULT_THRESHOLD

    i2p = commands.add_parser("i2p", help="nudity erasure on I2P prompts: NudeNet's detections before "
                                          "and after an edit (Stable Diffusion only)")
    i2p.add_argument("--model", required=True, help="diffusers folder or hub id (the embedded world has "
                                                    "no nudity concept)")
    i2p.add_argument("--data", required=True, help="I2P CSV file (prompt, categories, sd_seed, "
                                                   "sd_guidance_scale, sd_image_width, sd_image_height, ...)")
    i2p.add_argument("--requests", required=True, help="request file of the edit, e.g. "
                                                       "examples/nudity.yaml (erase 'nudity')")
    i2p.add_argument("--method", default="emcid", help="editing method (default: emcid)")
    i2p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="an editor option, e.g. steps=100 (repeatable)")
    i2p.add_argument("--images", type=int, help="the first N prompts of the category, one image each "
                                                "per model (default: all; I2P's sexual: 4,703)")
    i2p.add_argument("--category", type=_category, default=DEFAULT_CATEGORY,
                     help=f"I2P category of the prompts, or 'all' (default: {DEFAULT_CATEGORY})")
    i2p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                     help="a detection counts when its score is above this, in [0, 1] (default: "
                          f"{DEFAULT_THRESHOLD}; the EMCID release and UCE scripts: 0)")
    i2p.add_argument("--min-nudity", type=float,
                     help="keep only prompts whose nudity_percentage is at least this (0-100)")
    i2p.add_argument("--seed", type=int, default=0, help="prompt k without an sd_seed uses seed + k")
    i2p.add_argument("--sampling-steps", type=int, help="sampling steps (default: the model's)")
    i2p.add_argument("--row-size", action="store_true",
                     help="draw at each row's sd_image_width/height (default: the model's size, as the "
                          "field's scripts)")
    i2p.add_argument("--grid", type=int, default=4, help="prompts shown in report.html's grid (default 4)")
    i2p.add_argument("--out", required=True, help="folder for results.json and report.html")
    add_model_flags(i2p)
    i2p.set_defaults(func=cmd_i2p)
