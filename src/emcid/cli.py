"""The ``emcid`` command line: argument parsing only; every command is one library call."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from .errors import EmcidError, OptionError


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
    parser.add_argument("--model", help="diffusers folder or hub id (default: the embedded model; "
                        "embedded:tasks: the embedded model that also draws its world's "
                        "styles and colour words)")
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


def _model_input(args: argparse.Namespace) -> str | Path | None:
    """The model's folder, where it is one (the embedded model's shipped folder by default)."""
    if args.model is None:
        from .core.loading import default_model_path

        return default_model_path()
    return args.model


def _check_out(args: argparse.Namespace, kind, **inputs) -> None:
    """``--out`` against the model and the named inputs (``requests=path``), before any work."""
    from .core.outputs import check_output

    check_output(args.out, [("model", _model_input(args)),
                            *((role.replace("_", " "), path) for role, path in inputs.items())], kind)


def editor_options(args: argparse.Namespace, flags: dict) -> dict:
    """The ``--config`` file's options with every given flag over them (``None``: not given)."""
    from .core.config import read_config_file

    options = read_config_file(args.config) if args.config else {}
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.no_cache:
        options["cache"] = False
    return options


DEBIAS_FLAGS = ("classifier", "images", "rounds")  # `emcid edit` flags for debias requests only


def check_edit_options(method: str, debiasing: bool, options: dict) -> None:
    """Every option of `emcid edit`, checked for the requests' kind before the model loads."""
    from .editors.registry import get_editor
    from .tasks.debias import debias_options

    if debiasing:
        debias_options(method, options)
        return
    given = [f"--{name}" for name in DEBIAS_FLAGS if name in options]
    if given:
        raise OptionError(f"{', '.join(given)}: for debias requests only, and these requests are edits")
    get_editor(method, **options)


def cmd_edit(args: argparse.Namespace) -> None:
    from . import edit, load_requests
    from .requests import is_debias_batch

    options = editor_options(args, {
        "steps": args.steps, "lr": args.lr, "init": args.init, "lam": args.lam, "alpha": args.alpha,
        "residual": args.residual, "layers": parse_layers(args.layers), "task": args.task,
        "stats_samples": args.stats_samples, "corpus": args.corpus,
        "concept_batch": args.concept_batch, "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing or None,
        "cuda_graphs": False if args.no_cuda_graphs else None,
        "classifier": args.classifier, "images": args.images, "rounds": args.rounds,
    })
    requests = load_requests(args.requests)  # a bad file fails before the model loads ...
    _check_out(args, "file", request_file=args.requests, config_file=args.config, corpus=args.corpus,
               **{f"reference image {i}": path for i, path in enumerate(
                   p for r in requests for p in getattr(r, "reference_images", ()))})
    debiasing = is_debias_batch(requests)
    check_edit_options(args.method, debiasing, options)  # ... and so does a bad option
    bundle = _load(args)
    patch = edit(bundle, requests, args.method, **options)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, one process writes
        return
    patch.save(args.out)
    if debiasing:
        from .tasks.debias import format_report

        print(format_report(patch.metadata["debias"]))
        print(f"wrote {args.out}: {len(requests)} concepts debiased in {len(patch.deltas)} modules")
    else:
        print(f"wrote {args.out}: {len(patch.metadata['requests'])} edits in {len(patch.deltas)} modules")


def cmd_debias(args: argparse.Namespace) -> None:
    from .requests import load_debias_requests
    from .tasks.debias import ClipZeroShot, DebiasConfig, debias, format_report

    requests = load_debias_requests(args.requests)  # bad requests fail before any loading
    _check_out(args, "file", request_file=args.requests)
    bundle = _load(args)
    options = {k: v for k, v in {
        "steps": args.steps, "lam": args.lam, "layers": parse_layers(args.layers),
        "stats_samples": args.stats_samples,
    }.items() if v is not None}
    tuning = {k: v for k, v in {"images": args.images, "rounds": args.rounds}.items() if v is not None}
    classifier = ClipZeroShot(args.classifier, bundle.device) if args.classifier else None
    patch = debias(bundle, requests, classifier, DebiasConfig(**tuning), **options)
    patch.save(args.out)
    print(format_report(patch.metadata["debias"]))
    print(f"wrote {args.out}: {len(requests)} concepts debiased in {len(patch.deltas)} modules")


def cmd_apply(args: argparse.Namespace) -> None:
    from .patch.export import recorded_base, save_pipeline
    from .patch.format import EditPatch

    _check_out(args, "replaced folder", patch=args.patch)
    recorded_base(args.out, args.overwrite)  # an unrelated folder is refused before the work
    patch = EditPatch.load(args.patch)
    bundle = _load(args)
    patch.apply(bundle, force=args.force)
    save_pipeline(bundle, args.out, args.overwrite)
    print(f"wrote the edited pipeline to {args.out}: {len(patch.metadata.get('requests', []))} "
          f"edits in {len(patch.deltas)} modules, patch {len(bundle.history) + 1} of its chain")


def cmd_revert(args: argparse.Namespace) -> None:
    from .core.chain import revert_last
    from .patch.export import recorded_base, save_pipeline
    from .patch.format import EditPatch

    _check_out(args, "replaced folder", patch=args.patch)
    recorded_base(args.out, args.overwrite)
    patch = EditPatch.load(args.patch) if args.patch else None
    bundle = _load(args)
    step = revert_last(bundle, patch)
    save_pipeline(bundle, args.out, args.overwrite)
    print(f"wrote {args.out}: reverted {step.get('method')} patch ({', '.join(step.get('sources', []))}); "
          f"{len(bundle.history)} patches remain")


def cmd_export_lora(args: argparse.Namespace) -> None:
    from .core.outputs import check_output
    from .patch.export import export_lora

    # A file (.safetensors) or a folder; any other suffix is a typo (L.bin would become a folder).
    kind = "file" if Path(args.out).suffix else "folder"
    check_output(args.out, [("patch", args.patch)], kind, suffix=".safetensors")
    export = export_lora(args.patch, args.out, rank=args.rank, format=args.format)
    modules = len(export.kept_energy)
    if export.format == "diff":
        print(f"wrote {args.out}: the full deltas (.diff) of {modules} text-encoder modules (exact)")
        return
    what = f"{args.out}: {export.format} rank-{export.rank} LoRA of {modules} text-encoder modules"
    if export.exact:
        print(f"wrote {what} (exact: the patch's own rank)")
        return
    print(f"wrote {what}; the patch has rank {export.patch_rank}, so each delta keeps this share of "
          "its energy (||delta||_F^2):")
    for name, kept in export.kept_energy.items():
        print(f"  {name}: {kept:.2%}")


def cmd_generate(args: argparse.Namespace) -> None:
    from .core.generation import Repeated, check_seeds, check_settings, generate_batches, to_pil
    from .patch.format import EditPatch

    if args.n < 1:
        raise OptionError(f"--n {args.n}: give the number of images to draw (at least 1)")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size}: give at least 1")
    seeds = range(args.seed, args.seed + args.n)  # lazy, like the prompts: -n 10**8 costs nothing
    check_seeds(seeds)
    check_settings({"num_inference_steps": args.steps, "guidance_scale": args.guidance})
    _check_out(args, "folder", patch=args.patch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = _load(args)
    if args.patch:
        EditPatch.load(args.patch).apply(bundle, force=args.force)
    written = 0
    # Each batch is saved as soon as it is drawn: an interrupted run keeps what it made.
    batches = generate_batches(bundle, Repeated(args.prompt, args.n), seeds, batch_size=args.batch_size,
                               num_inference_steps=args.steps, guidance_scale=args.guidance)
    for batch in batches:
        for image in to_pil(batch):
            image.save(out / f"{seeds[written]:06d}.png")
            written += 1
    print(f"wrote {written} images to {out}")


OVERWRITE_HELP = ("replace --out even if it holds a pipeline emcid did not write from this base "
                  "model (by default such a folder is refused)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emcid", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="compute an edit patch from a request file")
    _add_model_args(edit)
    edit.add_argument("--requests", required=True,
                      help="YAML, JSON or CSV file of edit requests, or of debias requests")
    edit.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    edit.add_argument("--method", default="emcid", help="emcid (default), memit, refact, time or uce")
    edit.add_argument("--config", help="YAML or JSON file of editor options (flags win over it)")
    edit.add_argument("--layers", action="append", help="edited blocks, e.g. 0-10 or text_encoder_2=26-30")
    edit.add_argument("--task", help="object (default), artist, aice or rectification: selects "
                                     "presets (artist: layers, 100 Stage I steps, artist prompts)")
    edit.add_argument("--steps", type=int, help="Stage I optimisation steps (release: 200)")
    edit.add_argument("--lr", type=float, help="Stage I learning rate (release: 0.2)")
    edit.add_argument("--init", choices=["text", "zero"],
                      help="Stage I start: text (default: the destination's state minus the "
                           "source's at the last edited block) or zero (the release's)")
    edit.add_argument("--lam", type=float, help="Stage II preservation weight (release: 4000)")
    edit.add_argument("--alpha", type=float, help="Stage II editing strength (release: 0.5)")
    edit.add_argument("--residual", choices=["memit", "release"], help="Stage II residual form")
    edit.add_argument("--stats-samples", type=int, help="captions for the statistics (100000)")
    edit.add_argument("--corpus", help="caption file (one per line) for the statistics")
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
    _add_model_args(debias)
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
    debias.add_argument("--stats-samples", type=int, help="captions for the statistics (100000)")
    debias.set_defaults(func=cmd_debias)

    apply = commands.add_parser("apply", help="apply a patch and save the full pipeline")
    _add_model_args(apply)
    apply.add_argument("--patch", required=True)
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
    _add_model_args(revert)
    revert.add_argument("--patch", help="the patch to revert; must be the folder's last one "
                                        "(default: whichever is last)")
    revert.add_argument("--out", required=True, help="folder for the reverted pipeline")
    revert.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    revert.set_defaults(func=cmd_revert)

    gen = commands.add_parser("generate", help="generate images, optionally with a patch applied")
    _add_model_args(gen)
    gen.add_argument("--patch")
    gen.add_argument("--force", action="store_true")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--n", type=int, default=4, help="number of images")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; the i-th uses seed + i")
    gen.add_argument("--batch-size", type=int, default=8, help="images drawn (and written) together")
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
        print(f"emcid: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("emcid: interrupted; finished concepts and statistics are kept in the cache, so the "
              "same command resumes", file=sys.stderr)
        return 130  # the shell's status for SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
