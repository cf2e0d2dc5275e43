"""Where a Stage I step spends its time: torch.profiler over one batch of concepts.

    python benchmarks/stage1_profile.py [--model M] [--device cuda] [--batch 64] [--steps 20] [--parts]

Prints the wall time per step and the operators that take most host (CPU) time and, on a
GPU, most device time, plus the count of explicit synchronisations and memory copies: a step
whose host time exceeds its device time is overhead-bound (launches, Python), not compute-bound.
``--parts`` also times a step's three parts alone at the batch's rows: the text encoder after
the edited block (forward and backward), the UNet under the edited conditioning (forward and
backward) and the teacher's UNet pass (forward only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from engine_speed import requests_for  # this folder is on sys.path when run as a script
from torch.profiler import ProfilerActivity, profile

import emcid
from emcid.core.cache import TensorCache
from emcid.core.config import Runtime
from emcid.core.generation import resolve_settings
from emcid.editors.emcid import EMCIDEditor
from emcid.editors.emcid.stage1 import Stage1Config, compute_z
from emcid.editors.emcid.stage1.objective import encode_edited, layout


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def milliseconds(function, device: torch.device, repeats: int = 5) -> float:
    function()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / repeats


def time_parts(bundle, requests: list[emcid.EditRequest], z_layer: dict[str, int],
               images: TensorCache) -> None:
    """Each part of a step alone, on every source prompt of ``requests`` (one row each)."""
    batch = layout(bundle, requests, z_layer, Stage1Config(noise_weight=0.0), images)
    prompts, rows = batch.src_prompts, batch.text
    vectors = {name: torch.zeros(bundle.slot(name).hidden_size, device=bundle.device, requires_grad=True)
               for name in z_layer}

    def text() -> torch.Tensor:
        return encode_edited(bundle, rows.ids, z_layer, rows.prefix, rows.positions, vectors).embeds

    embeds = text().detach().requires_grad_(True)
    settings = resolve_settings(bundle)
    scale = bundle.latent_scale()
    latents = torch.randn(len(prompts), bundle.unet.config.in_channels, settings["height"] // scale,
                          settings["width"] // scale, device=bundle.device)
    t = torch.randint(0, 1000, (len(prompts),), device=bundle.device)

    def unet() -> torch.Tensor:
        return bundle.unet(latents, t, encoder_hidden_states=embeds).sample

    def teacher() -> None:
        with torch.no_grad():
            unet()

    parts = {"text encoder after the edited block, forward and backward":
             lambda: text().pow(2).mean().backward(),
             "UNet, edited conditioning, forward and backward": lambda: unet().pow(2).mean().backward(),
             "UNet, teacher, forward": teacher}
    for label, function in parts.items():
        print(f"{label}, {len(prompts)} rows: {milliseconds(function, bundle.device):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="concepts side by side")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    parser.add_argument("--parts", action="store_true", help="also time a step's parts alone")
    args = parser.parse_args()
    if not 1 <= args.batch <= 500:
        raise SystemExit("--batch: 1 to 500 concepts (pairs of the 1,000 ImageNet classes)")
    bundle = emcid.load_model(args.model, device=args.device)
    editor = EMCIDEditor.create(bundle)
    z_layer = {slot: max(indices) for slot, indices in editor.layers_for(bundle).items()}
    requests = requests_for(args.batch)
    config = Stage1Config(steps=args.steps, stop_tolerance=0.0, image_guidance_scale=None, image_steps=None)
    runtime = Runtime(concept_batch=args.batch, precision=args.precision)
    # The warm-up draws and caches the source images, so the timed runs measure the steps.
    images = TensorCache("images", root=Path(tempfile.mkdtemp(prefix="emcid-profile-")))
    compute_z(bundle, requests, z_layer, replace(config, steps=2), images, runtime)
    synchronize(bundle.device)
    start = time.perf_counter()
    compute_z(bundle, requests, z_layer, config, images, runtime)
    synchronize(bundle.device)
    seconds = time.perf_counter() - start
    step = 1000 * seconds / args.steps
    print(f"{args.batch} concepts x {args.steps} steps on {args.device}: {step:.1f} ms per step, "
          f"{step / args.batch:.2f} ms per concept per step (setup included)")
    if args.parts:
        time_parts(bundle, requests, z_layer, images)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bundle.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        compute_z(bundle, requests, z_layer, config, images, runtime)
        synchronize(bundle.device)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if bundle.device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    for label, keys in (("synchronisations", ("cudaStreamSynchronize", "cudaDeviceSynchronize")),
                        ("memory copies, any direction", ("cudaMemcpyAsync", "cudaMemcpy"))):
        count = sum(e.count for e in events if e.key in keys)
        print(f"{label}: {count} ({count / args.steps:.1f} per step)")


if __name__ == "__main__":
    main()
