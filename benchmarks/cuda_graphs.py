"""Stage I on CUDA with every step eager against steps replayed as one CUDA graph.

    python benchmarks/cuda_graphs.py [--model M | --family sd1] [--batches 1,8,64] [--steps 50]

Per batch size: milliseconds per step in the steady state (the difference of a long and a
short run, so setup, warm-up and capture are not counted) and for the whole run, peak memory,
and how far the graphed run's deltas are from the eager run's (cosine, largest relative
difference). ``--family sd1`` builds the SD 1.4-shaped random pipeline of ``sd_scale.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

import torch
from engine_speed import requests_for  # this folder is on sys.path when run as a script

import emcid
from emcid.core.cache import TensorCache
from emcid.core.config import Runtime
from emcid.editors.emcid import EMCIDEditor
from emcid.editors.emcid.stage1 import Stage1Config, compute_z
from emcid.editors.emcid.stage1.engine import Stepper


def timed_run(bundle, requests, z_layer, config, images, runtime) -> tuple[float, list]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    targets = compute_z(bundle, requests, z_layer, config, images, runtime)
    torch.cuda.synchronize()
    return time.perf_counter() - start, targets


def agreement(eager: list, graphed: list) -> tuple[float, float]:
    """Smallest cosine and largest relative difference between matching deltas."""
    cosines, differences = [], []
    for a, b in zip(eager, graphed, strict=True):
        for name, delta in a.deltas.items():
            other = b.deltas[name]
            cosines.append(float(torch.nn.functional.cosine_similarity(delta, other, dim=0)))
            differences.append(float((delta - other).norm() / delta.norm()))
    return min(cosines), max(differences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or hub id (default: the embedded model)")
    parser.add_argument("--family", choices=["sd1", "sdxl"],
                        help="instead of --model: sd_scale.py's random pipeline of this shape")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--steps", type=int, default=50, help="steps of the long run")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graphs.py needs a CUDA device")
    short = Stepper.WARMUP + 2  # warm-up, capture and one replay
    if args.steps <= short:
        raise SystemExit(f"--steps: more than {short}")
    os.environ.setdefault("EMCID_CACHE", tempfile.mkdtemp(prefix="emcid-graphs-"))
    if args.family:
        from sd_scale import build_bundle

        bundle = build_bundle(args.family, "cuda", True, ["a photo"])
    else:
        bundle = emcid.load_model(args.model, device="cuda")
    editor = EMCIDEditor.create(bundle)
    z_layer = {slot: max(indices) for slot, indices in editor.layers_for(bundle).items()}
    config = Stage1Config(steps=args.steps, stop_tolerance=0.0, image_guidance_scale=None, image_steps=2)
    images = TensorCache("graph-images", enabled=False)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; model "
          f"{args.family or bundle.source}; precision {args.precision}; {args.steps} steps")
    for batch in (int(b) for b in args.batches.split(",")):
        requests = requests_for(batch)
        results = {}
        for graphs in (False, True):
            runtime = Runtime(concept_batch=batch, precision=args.precision, cuda_graphs=graphs)
            compute_z(bundle, requests, z_layer, replace(config, steps=1), images, runtime)
            brief, _ = timed_run(bundle, requests, z_layer, replace(config, steps=short), images, runtime)
            torch.cuda.reset_peak_memory_stats()
            whole, targets = timed_run(bundle, requests, z_layer, config, images, runtime)
            steady = 1000 * (whole - brief) / (args.steps - short)
            peak = torch.cuda.max_memory_allocated() / 2**30
            results[graphs] = targets
            print(f"concept_batch {batch}, {'graphs' if graphs else 'eager '}: {steady:.1f} ms per "
                  f"step steady ({steady / batch:.2f} per concept), {1000 * whole / args.steps:.1f} "
                  f"ms per step over the run, peak {peak:.2f} GiB")
            torch.cuda.empty_cache()
        cosine, difference = agreement(results[False], results[True])
        print(f"concept_batch {batch}: graphed against eager deltas, cosine min {cosine:.6f}, "
              f"relative difference max {difference:.2e}")


if __name__ == "__main__":
    main()
