"""The ``emcid`` command line: argument parsing only; every command is one library call
(:mod:`emcid.cli_commands`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from .cli_commands import (
    add_model_args,
    cmd_apply,
    cmd_debias,
    cmd_edit,
    cmd_export_lora,
    cmd_generate,
    cmd_revert,
)
from .errors import EmcidError

STATS_HELP = "captions for the statistics (release: 100,000; the embedded model sets 5,000)"
OVERWRITE_HELP = ("replace --out even if it holds a pipeline emcid did not write from this base "
                  "model (by default such a folder is refused)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emcid")
    except PackageNotFoundError:
        return "unknown"


def _quiet_libraries() -> None:
    """transformers', diffusers' and the hub's warnings and loading bars off (``-v`` keeps
    them): a command prints its own progress and result, not three libraries' chatter."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    disable_progress_bars()
    for module in ("huggingface_hub", "transformers", "diffusers", "torch"):
        warnings.filterwarnings("ignore", module=module)


DESCRIPTION = """Edit many concepts at once in a Stable Diffusion model (EMCID): `edit` computes
a small, revertible patch from a request file; `apply` writes the edited pipeline, `revert`
takes a patch off, `export-lora` writes it as a LoRA for diffusers, A1111, kohya and ComfyUI,
and `generate` draws images. Without --model every command uses the embedded miniature model;
`emcid demo` runs the whole method and benchmark on it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emcid", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and the libraries' own warnings and loading bars")
    parser.add_argument("--version", action="version", version=f"emcid {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="compute an edit patch from a request file")
    add_model_args(edit)
    edit.add_argument("--requests", required=True,
                      help="YAML, JSON or CSV file of edit requests, or of debias requests")
    edit.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    edit.add_argument("--method", default="emcid", help="emcid (default), memit, refact, time, uce or esd")
    edit.add_argument("--config", help="YAML or JSON file of editor options (flags win over it)")
    edit.add_argument("--layers", action="append", help="edited blocks, e.g. 0-10 or text_encoder_2=26-30")
    edit.add_argument("--task", help="object (default), artist, aice or rectification: selects "
                                     "presets (artist: layers, 100 Stage I steps, artist prompts)")
    edit.add_argument("--steps", type=int, help="Stage I optimisation steps (release: 200; esd: "
                                                "iterations per concept, paper 1000)")
    edit.add_argument("--lr", type=float, help="Stage I learning rate (release: 0.2)")
    edit.add_argument("--lr-schedule", choices=["constant", "cosine"],
                      help="Stage I rate over the steps: constant (default, the release's) or "
                           "cosine (from --lr down towards 0)")
    edit.add_argument("--stop-tolerance", type=float,
                      help="Stage I stopping rule: a concept stops once its 25-step mean loss falls "
                           "by less than this share, e.g. 0.1 (0, the default: every concept runs "
                           "--steps, as the release)")
    edit.add_argument("--init", choices=["text", "zero"],
                      help="Stage I start: text (default: the destination's state minus the "
                           "source's at the last edited block) or zero (the release's)")
    edit.add_argument("--distil-on", choices=["both", "source", "destination"],
                      help="Stage I's images: both (default: each prompt's source image and the "
                           "unedited model's image of its destination, a row each), source (the "
                           "release's; the default of --task artist and of debias) or destination")
    edit.add_argument("--lam", type=float, help="Stage II preservation weight (release: 4000)")
    edit.add_argument("--alpha", type=float, help="Stage II editing strength (release: 0.5)")
    edit.add_argument("--residual", choices=["memit", "release"], help="Stage II residual form")
    edit.add_argument("--profile", help="a named set of options: release (the EMCID release's Stage I "
                                        "start, conditioning, latents and fixed steps, and its Stage II "
                                        "residual)")
    edit.add_argument("--stats-samples", type=int, help=STATS_HELP)
    edit.add_argument("--corpus", help="caption file for the statistics: COCO captions JSON, a "
                                       "JSON list or JSON lines, a CSV/TSV caption column, or one "
                                       "caption per line")
    edit.add_argument("--no-cache", action="store_true", help="recompute everything")
    edit.add_argument("--classifier", help="debias requests: CLIP model (hub id or folder) that "
                                           "classifies the images (default: CLIP ViT-L/14; on the "
                                           "embedded world, its judge)")
    edit.add_argument("--images", type=int, help="debias requests: images per tuning round (25)")
    edit.add_argument("--rounds", type=int, help="debias requests: most tuning rounds per concept (10)")
    edit.add_argument("--concept-batch", type=int, help="most Stage I concepts side by side")
    edit.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                      help="Stage I UNet autocast (auto: bf16 on CUDA, fp32 elsewhere)")
    edit.add_argument("--grad-checkpointing", action="store_true",
                      help="Stage I: recompute UNet activations (less GPU memory)")
    edit.add_argument("--no-cuda-graphs", action="store_true",
                      help="Stage I on CUDA: run every step eagerly, not as a replayed CUDA graph")
    edit.set_defaults(func=cmd_edit)

    debias = commands.add_parser("debias", help="balance concepts over attribute values (one patch)")
    add_model_args(debias)
    debias.add_argument("--requests", required=True,
                        help="YAML, JSON or CSV debias requests ({source: doctor, debias: [male, female]})")
    debias.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    debias.add_argument("--classifier",
                        help="CLIP model (hub id or folder) that classifies the images zero-shot "
                             "(default: CLIP ViT-L/14; on the embedded world, its judge)")
    debias.add_argument("--images", type=int, help="images per tuning round (release: 25)")
    debias.add_argument("--rounds", type=int, help="most tuning rounds per concept (release: 10)")
    debias.add_argument("--layers", action="append", help="edited blocks, e.g. 0-10")
    debias.add_argument("--steps", type=int, help="Stage I optimisation steps (release: 200)")
    debias.add_argument("--lam", type=float, help="Stage II preservation weight (release: 4000)")
    debias.add_argument("--stats-samples", type=int, help=STATS_HELP)
    debias.set_defaults(func=cmd_debias)

    apply = commands.add_parser("apply", help="apply a patch and save the full pipeline")
    add_model_args(apply)
    apply.add_argument("--patch", required=True, help="patch file from `emcid edit`")
    apply.add_argument("--out", required=True, help="folder for the edited diffusers pipeline")
    apply.add_argument("--force", action="store_true", help="apply to a model of another fingerprint")
    apply.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    apply.set_defaults(func=cmd_apply)

    lora = commands.add_parser("export-lora",
                               help="write a patch's text-encoder deltas as a LoRA file (A1111, kohya, "
                                    "ComfyUI, diffusers)")
    lora.add_argument("--patch", required=True, help="patch file from `emcid edit`")
    lora.add_argument("--out", required=True,
                      help="LoRA file (.safetensors), or a folder for diffusers' default file name")
    lora.add_argument("--rank", type=int,
                      help="LoRA rank (default: the patch's; lower ranks keep the top singular directions)")
    lora.add_argument("--format", default="kohya",
                      help="kohya: lora_te_* names (A1111, kohya sd-scripts, ComfyUI, diffusers; default); "
                           "diffusers: diffusers' own names; diff: each delta in full as .diff keys "
                           "(A1111, ComfyUI; exact, no --rank)")
    lora.set_defaults(func=cmd_export_lora)
    revert = commands.add_parser(
        "revert", help="take the last patch off a pipeline folder written by apply (bit exact)")
    add_model_args(revert)
    revert.add_argument("--patch", help="the patch to revert; must be the folder's last one "
                                        "(default: whichever is last)")
    revert.add_argument("--out", required=True, help="folder for the reverted pipeline")
    revert.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    revert.set_defaults(func=cmd_revert)

    gen = commands.add_parser("generate", help="generate images, optionally with a patch applied")
    add_model_args(gen)
    gen.add_argument("--patch", help="patch file from `emcid edit` to apply before drawing")
    gen.add_argument("--force", action="store_true",
                     help="apply --patch to a model of another fingerprint")
    gen.add_argument("--prompt", required=True, help="the text to draw")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    gen.add_argument("-n", "--num-images", dest="n", type=int, default=4, help="number of images (4)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; the i-th uses seed + i")
    gen.add_argument("--batch-size", type=int, default=8, help="images drawn (and written) together")
    gen.add_argument("--sampling-steps", type=int, help="sampling steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    gen.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    gen.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
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
    if not args.verbose:
        _quiet_libraries()
    # Stage I's cost and its unconverged concepts are the user's bill and warning: shown always.
    logging.getLogger("emcid.editors.emcid.stage1.report").setLevel(logging.INFO)
    try:
        args.func(args)
    except (EmcidError, FileNotFoundError) as exc:
        print(f"emcid: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("emcid: interrupted; finished concepts and statistics are kept in the cache, so the "
              "same command resumes", file=sys.stderr)
        return 130  # the shell's status for SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
