"""The ``emcid`` command line: argument parsing only; every command is one library call."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from .errors import EmcidError


def parse_layers(values: list[str] | None) -> dict[str, list[int]] | None:
    """``--layers 0-10`` (first text encoder) or ``--layers text_encoder_2=26-30`` (repeatable)."""
    if not values:
        return None
    layers: dict[str, list[int]] = {}
    for value in values:
        name, _, spec = value.rpartition("=")
        indices: list[int] = []
        for part in spec.split(","):
            first, _, last = part.partition("-")
            try:
                indices += list(range(int(first), int(last or first) + 1))
            except ValueError as exc:
                raise EmcidError(
                    f"--layers {value!r}: expected e.g. 0-10, 3,5,7 or text_encoder_2=26-30"
                ) from exc
        layers[name or "text_encoder"] = indices
    return layers


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="diffusers folder or hub id (default: the embedded model)")
    parser.add_argument("--device", default="cpu",
                        help="torch device (cpu, cuda, cuda:1) or 'auto': this process's device under "
                             "accelerate launch")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .bin/.ckpt checkpoints (they can run code when loaded)")


def _load(args: argparse.Namespace):
    from . import load_model

    device = args.device
    if device == "auto":
        from accelerate import PartialState

        device = PartialState().device
    return load_model(args.model, device=device, allow_pickle=args.allow_pickle)


def cmd_edit(args: argparse.Namespace) -> None:
    from . import edit, load_requests

    bundle = _load(args)
    options = {k: v for k, v in {
        "steps": args.steps, "lr": args.lr, "lam": args.lam, "alpha": args.alpha,
        "residual": args.residual, "layers": parse_layers(args.layers), "task": args.task,
        "stats_samples": args.stats_samples, "corpus": args.corpus,
        "concept_batch": args.concept_batch, "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing or None,
    }.items() if v is not None}
    if args.no_cache:
        options["cache"] = False
    patch = edit(bundle, load_requests(args.requests), method=args.method, **options)
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, one process writes
        patch.save(args.out)
        print(f"wrote {args.out}: {len(patch.metadata['requests'])} edits in {len(patch.deltas)} modules")


def cmd_apply(args: argparse.Namespace) -> None:
    from .patch import EditPatch

    bundle = _load(args)
    EditPatch.load(args.patch).apply(bundle, force=args.force)
    export_pipeline(bundle, args.out)
    print(f"wrote the edited pipeline to {args.out}")


def export_pipeline(bundle, folder: str | Path) -> None:
    """Save the (patched) pipeline with save_pretrained, carrying emcid's settings along."""
    from .models import write_settings

    bundle.pipeline.save_pretrained(folder, safe_serialization=True)
    write_settings(bundle, folder)


def cmd_generate(args: argparse.Namespace) -> None:
    from .generation import generate
    from .patch import EditPatch

    bundle = _load(args)
    if args.patch:
        EditPatch.load(args.patch).apply(bundle, force=args.force)
    seeds = [args.seed + i for i in range(args.n)]
    images = generate(bundle, [args.prompt] * args.n, seeds, num_inference_steps=args.steps,
                      guidance_scale=args.guidance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(seeds, images):
        image.save(out / f"{seed:06d}.png")
    print(f"wrote {len(images)} images to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emcid", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="compute an edit patch from a request file")
    _add_model_args(edit)
    edit.add_argument("--requests", required=True, help="YAML, JSON or CSV file of edit requests")
    edit.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    edit.add_argument("--method", default="emcid", help="emcid (default), memit, refact, time or uce")
    edit.add_argument("--layers", action="append", help="edited blocks, e.g. 0-10 or text_encoder_2=26-30")
    edit.add_argument("--task", choices=["object", "artist"], help="selects the default layers")
    edit.add_argument("--steps", type=int, help="Stage I optimisation steps (release: 200)")
    edit.add_argument("--lr", type=float, help="Stage I learning rate (release: 0.2)")
    edit.add_argument("--lam", type=float, help="Stage II preservation weight (release: 4000)")
    edit.add_argument("--alpha", type=float, help="Stage II editing strength (release: 0.5)")
    edit.add_argument("--residual", choices=["memit", "release"], help="Stage II residual form")
    edit.add_argument("--stats-samples", type=int, help="captions for the statistics (100000)")
    edit.add_argument("--corpus", help="caption file (one per line) for the statistics")
    edit.add_argument("--no-cache", action="store_true", help="recompute everything")
    edit.add_argument("--concept-batch", type=int, help="most Stage I concepts side by side")
    edit.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                      help="Stage I UNet autocast (auto: bf16 on CUDA, fp32 elsewhere)")
    edit.add_argument("--grad-checkpointing", action="store_true",
                      help="Stage I: recompute UNet activations (less GPU memory)")
    edit.set_defaults(func=cmd_edit)

    apply = commands.add_parser("apply", help="apply a patch and save the full pipeline")
    _add_model_args(apply)
    apply.add_argument("--patch", required=True)
    apply.add_argument("--out", required=True, help="folder for the edited diffusers pipeline")
    apply.add_argument("--force", action="store_true", help="apply to a model of another fingerprint")
    apply.set_defaults(func=cmd_apply)

    gen = commands.add_parser("generate", help="generate images, optionally with a patch applied")
    _add_model_args(gen)
    gen.add_argument("--patch")
    gen.add_argument("--force", action="store_true")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--n", type=int, default=4)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    gen.add_argument("--out", required=True, help="folder for the PNG files")
    gen.set_defaults(func=cmd_generate)

    _register_optional(commands)
    return parser


def _register_optional(commands) -> None:
    """Command groups of the embedded world and the benchmarks, when they are installed."""
    for module_name in ("emcid.mini.cli", "emcid.bench.cli"):
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (EmcidError, FileNotFoundError) as exc:
        print(f"emcid: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
