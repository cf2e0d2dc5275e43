"""What each ``emcid`` command does with its parsed arguments: one library call, with its inputs
and outputs checked before any work (the parser is :mod:`emcid.cli`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import EmcidError, OptionError


def counted(number: int, noun: str) -> str:
    """``1 edit``, ``2 edits``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="diffusers folder or hub id (default: the embedded model; "
                        "embedded:tasks: the embedded model that also draws its world's "
                        "styles and colour words)")
    parser.add_argument("--device", default="auto",
                        help="torch device (cpu, cuda, cuda:1) or auto (default): this process's GPU "
                             "under accelerate launch, else the first GPU, else the CPU")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow .bin/.ckpt checkpoints (they can run code when loaded)")


def _load(args: argparse.Namespace):
    from . import load_model

    return load_model(args.model, device=auto_device(args.device), allow_pickle=args.allow_pickle)


def auto_device(device: str) -> str:
    """``auto``: this process's GPU when launched on several (``LOCAL_RANK``), else CUDA if there
    is a GPU, else the CPU (never MPS by surprise). accelerate's state is not touched here:
    it is made once, by Stage I, with the settings that shard the work."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"


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
    from .core.config import check_corpus
    from .editors.registry import get_editor
    from .tasks.debias import debias_options

    if debiasing:
        debias_options(method, options)
    else:
        given = [f"--{name}" for name in DEBIAS_FLAGS if name in options]
        if given:
            raise OptionError(f"{', '.join(given)}: for debias requests only, and these requests are edits")
        get_editor(method, **options)
    check_corpus(options.get("corpus"))  # the editor reads it only after the model has loaded


def cmd_edit(args: argparse.Namespace) -> None:
    from . import edit, load_requests
    from .requests import is_debias_batch

    options = editor_options(args, {
        "steps": args.steps, "lr": args.lr, "lr_schedule": args.lr_schedule,
        "stop_tolerance": args.stop_tolerance, "init": args.init, "distil_on": args.distil_on,
        "lam": args.lam, "alpha": args.alpha,
        "residual": args.residual, "layers": parse_layers(args.layers), "task": args.task,
        "profile": args.profile, "stats_samples": args.stats_samples, "corpus": args.corpus,
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
        print(f"wrote {args.out}: {counted(len(requests), 'concept')} debiased in "
              f"{counted(len(patch.deltas), 'module')}")
    else:
        print(f"wrote {args.out}: {counted(len(patch.metadata['requests']), 'edit')} in "
              f"{counted(len(patch.deltas), 'module')}")


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
    print(f"wrote {args.out}: {counted(len(requests), 'concept')} debiased in "
          f"{counted(len(patch.deltas), 'module')}")


def cmd_apply(args: argparse.Namespace) -> None:
    from .patch.export import recorded_base, save_pipeline
    from .patch.format import EditPatch

    _check_out(args, "replaced folder", patch=args.patch)
    recorded_base(args.out, args.overwrite)  # an unrelated folder is refused before the work
    patch = EditPatch.load(args.patch)
    bundle = _load(args)
    patch.apply(bundle, force=args.force)
    save_pipeline(bundle, args.out, args.overwrite)
    print(f"wrote the edited pipeline to {args.out}: "
          f"{counted(len(patch.metadata.get('requests', [])), 'edit')} in "
          f"{counted(len(patch.deltas), 'module')}, patch {len(bundle.history) + 1} of its chain")


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
        raise OptionError(f"--num-images {args.n}: give the number of images to draw (at least 1)")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size}: give at least 1")
    seeds = range(args.seed, args.seed + args.n)  # lazy, like the prompts: -n 10**8 costs nothing
    check_seeds(seeds)
    settings = {"num_inference_steps": args.sampling_steps, "guidance_scale": args.guidance,
                "height": args.height, "width": args.width}
    check_settings(settings)
    _check_out(args, "folder", patch=args.patch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = _load(args)
    if args.patch:
        EditPatch.load(args.patch).apply(bundle, force=args.force)
    written = 0
    # Each batch is saved as soon as it is drawn: an interrupted run keeps what it made.
    batches = generate_batches(bundle, Repeated(args.prompt, args.n), seeds, batch_size=args.batch_size,
                               negative_prompt=args.negative_prompt, **settings)
    for batch in batches:
        for image in to_pil(batch):
            image.save(out / f"{seeds[written]:06d}.png")
            written += 1
    print(f"wrote {written} images to {out}")
