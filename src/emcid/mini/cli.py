"""The `emcid mini ...` command group; argument parsing only, one library call per command."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `mini train`, `mini render` and `mini judge-check` to an emcid subparsers object."""
    mini = subparsers.add_parser("mini", help="the embedded procedural world and its model")
    sub = mini.add_subparsers(dest="mini_command", required=True)

    train = sub.add_parser("train", help="train the embedded model (all stages, resumable)")
    train.add_argument("--out", required=True, help="output folder (pipeline/, judge/, work/)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue an existing --out")
    train.add_argument("--unet-steps", type=int, help="UNet training steps (default 6000)")
    train.add_argument("--text-steps", type=int, help="text encoder pretraining steps")
    train.add_argument("--vae-steps", type=int, help="VAE training steps")
    train.add_argument("--judge-steps", type=int, help="judge training steps")
    train.add_argument("--max-minutes", type=float, help="wall-clock cap of the UNet stage")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    train.add_argument("--reuse-from", metavar="WORK",
                       help="an earlier run's work/ folder whose finished stages are copied")
    train.add_argument("--reuse-stages", nargs="+", default=["vae", "judge"], metavar="STAGE",
                       help="which stages --reuse-from copies (default: vae judge; the text side "
                            "(tokenizer text_encoder conditioning) only with the same text settings)")
    train.add_argument("--text-lr", type=float, help="text encoder peak learning rate")
    train.add_argument("--text-init", metavar="FOLDER",
                       help="fine-tune this CLIPTextModel folder instead of a fresh encoder "
                            "(same tokenizer)")
    train.add_argument("--unet-lr", type=float, help="UNet peak learning rate (default 6e-4)")
    train.add_argument("--unet-init", metavar="FOLDER",
                       help="start the UNet from this diffusers UNet folder (same shape)")
    train.add_argument("--after-clean-rate", type=float,
                       help="share of UNet samples whose states after the subject are the empty "
                            "prompt's (default 0.3)")
    train.add_argument("--conflict-rate", type=float,
                       help="share of UNet samples whose later states are another prompt's "
                            "(default 0.3)")
    train.add_argument("--padding-clean-rate", type=float,
                       help="share of UNet samples whose padding is the empty prompt's (default 0.2)")
    train.add_argument("--task-rate", type=float,
                       help="share of each UNet batch showing the world's styles and colour words "
                            "(mini/styles.py; default 0: none)")
    train.add_argument("--task-mix", type=float, nargs=3, metavar=("ALONE", "STYLED", "COLOUR"),
                       help="shares of the task bank: a style alone, an object in a style, an object "
                            "on a colour word (default 0.35 0.4 0.25)")
    train.add_argument("--task-examples", type=int, help="rows of the task bank (default 32768)")
    train.add_argument("--style-steps", type=int,
                       help="fine-tune the text encoder this many steps so that \"<object> in the "
                            "style of X\" reads as the object on X's colour (mini/style_encoder.py; "
                            "default 0: no fine-tune)")
    train.add_argument("--style-lr", type=float, help="peak learning rate of --style-steps (default 5e-4)")
    train.add_argument("--conflict-from", choices=["subject", "end_of_text"],
                       help="UNet conflict augmentation: replace only the end of text on "
                            "(default) or every state after the subject")
    train.set_defaults(func=cmd_train)

    render = sub.add_parser("render", help="write true renders of concepts as PNG files")
    render.add_argument("--concept", type=int, nargs="+", required=True)
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--out", required=True)
    render.set_defaults(func=cmd_render)

    check = sub.add_parser("judge-check", help="judge top-1 on fresh clean renders")
    check.add_argument("--seed", type=int, default=12345)
    check.set_defaults(func=cmd_judge_check)


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from .style_encoder import StyleTuneConfig
    from .train import MiniTrainConfig, train_mini

    torch.set_num_threads(args.threads)
    top_level = {  # MiniTrainConfig field <- command-line option
        "unet_steps": args.unet_steps,
        "unet_lr": args.unet_lr,
        "unet_init": args.unet_init,
        "vae_steps": args.vae_steps,
        "conflict_from": args.conflict_from,
        "after_subject_clean_rate": args.after_clean_rate,
        "after_subject_conflict_rate": args.conflict_rate,
        "padding_clean_rate": args.padding_clean_rate,
        "task_rate": args.task_rate,
        "task_mix": tuple(args.task_mix) if args.task_mix else None,
        "task_examples": args.task_examples,
    }
    given = {name: value for name, value in top_level.items() if value is not None}
    try:
        style = StyleTuneConfig(seed=args.seed, **{name: value for name, value in (
            ("steps", args.style_steps), ("lr", args.style_lr)) if value is not None})
        cfg = MiniTrainConfig(seed=args.seed, max_minutes=args.max_minutes, style=style, **given)
    except ValueError as exc:
        raise SystemExit(f"emcid mini train: {exc}") from None
    cfg.text.seed = cfg.judge.seed = args.seed
    if args.text_steps is not None:
        cfg.text.steps = args.text_steps
    if args.text_lr is not None:
        cfg.text.lr = args.text_lr
    if args.text_init is not None:
        cfg.text.init_from = args.text_init
    if args.judge_steps is not None:
        cfg.judge.steps = args.judge_steps
    log.info("mini train config: %s", json.dumps(asdict(cfg)))
    folder = train_mini(args.out, cfg, resume=args.resume, reuse_from=args.reuse_from,
                        reuse_stages=tuple(args.reuse_stages))
    print(folder)


def cmd_render(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .world import render

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for c in args.concept:
        render(c, args.seed).save(out / f"concept{c:04d}_seed{args.seed}.png")


def cmd_judge_check(args: argparse.Namespace) -> None:
    from .judge import judge_accuracy, load_judge

    print(f"judge clean top-1: {judge_accuracy(load_judge(), seed=args.seed):.4f}")
