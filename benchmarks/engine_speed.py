"""Engine timings: Stage I per concept (one at a time vs side by side), Stage II and statistics.

    python benchmarks/engine_speed.py [--model M] [--device cpu] [--steps 50] [--edits 1,10,100]
        [--batches 1,8,64] [--inits text,zero] [--distil-on both,source]

Without --model it runs on the embedded model (or the tiny random model where that is
absent). Prints one line per measurement; numbers depend on the machine, so say which.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace

import torch

import emcid
from emcid.concepts import imagenet1k_classes
from emcid.core.cache import TensorCache
from emcid.core.config import Runtime
from emcid.core.stats import second_moments
from emcid.editors.emcid import EMCIDEditor
from emcid.editors.emcid.stage1 import Stage1Config, compute_targets
from emcid.editors.emcid.stage2 import Stage2Config, compute_deltas


def requests_for(count: int) -> list[emcid.EditRequest]:
    classes = imagenet1k_classes()
    return [emcid.EditRequest(classes[i].name, classes[999 - i].name, seed=i) for i in range(count)]


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def cpu_timed(function, *args, **kwargs) -> tuple[float, float]:
    """Wall and CPU seconds: on a shared machine the CPU time is the steadier figure."""
    start, cpu = time.perf_counter(), time.process_time()
    function(*args, **kwargs)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--edits", default="1,10,100")
    parser.add_argument("--stats-samples", type=int, default=2000)
    parser.add_argument("--batches", default="1,8,64", help="Stage I concept_batch values to time")
    parser.add_argument("--inits", default="text", help="Stage I starts to time (text, zero)")
    parser.add_argument("--distil-on", default="both",
                        help="Stage I images to time (both, source, destination): rows per step")
    args = parser.parse_args()
    os.environ.setdefault("EMCID_CACHE", tempfile.mkdtemp(prefix="emcid-bench-"))
    bundle = emcid.load_model(args.model, device=args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, device {args.device}; model {bundle.source}")
    editor = EMCIDEditor.create(bundle)
    layers = editor.layers_for(bundle)
    z_layer = {slot: max(indices) for slot, indices in layers.items()}
    names = [bundle.slot(s).fc2_name(i) for s, indices in layers.items() for i in indices]

    seconds, _ = timed(second_moments, bundle, names, None, args.stats_samples,
                       cache=TensorCache("stats", enabled=False), progress=False)
    print(f"statistics: {args.stats_samples / seconds:.0f} captions/s over {len(names)} layers")
    moments = second_moments(bundle, names, None, args.stats_samples, progress=False)

    batches = [int(b) for b in args.batches.split(",")]
    sides = args.distil_on.split(",")
    for batch, init, side in ((b, i, d) for b in batches for i in args.inits.split(",") for d in sides):
        # at least 8 concepts per measurement; one at a time needs no more to be steady
        probe = requests_for(max(batch, 8))
        config = Stage1Config(steps=args.steps, stop_tolerance=0.0, image_guidance_scale=None,
                              image_steps=None, init=init, distil_on=side)
        runtime = Runtime(concept_batch=batch)
        # Warm-up: every probe concept's source images are generated and cached here, so the
        # timed run measures only the optimisation.
        compute_targets(bundle, probe, z_layer, replace(config, steps=1), TensorCache("s1", enabled=False),
                        progress=False, runtime=runtime)
        seconds, cpu = cpu_timed(compute_targets, bundle, probe, z_layer, config,
                                 TensorCache("s1", enabled=False), progress=False, runtime=runtime)
        print(f"Stage I ({init} start, distil_on {side}), {args.steps} steps, concept_batch {batch}: "
              f"{seconds / len(probe):.2f} s/concept ({cpu / len(probe):.2f} s of CPU time)")

    largest = max(int(e) for e in args.edits.split(","))
    quick = Stage1Config(steps=1, image_guidance_scale=None, image_steps=None)
    targets = compute_targets(bundle, requests_for(largest), z_layer, quick, progress=False,
                              runtime=Runtime(concept_batch=32))
    for count in sorted(int(e) for e in args.edits.split(",")):
        seconds, _ = timed(compute_deltas, bundle, targets[:count], layers, moments, Stage2Config(),
                           progress=False)
        print(f"Stage II, {count} edits over {len(names)} layers: {seconds:.2f} s")


if __name__ == "__main__":
    main()
