"""Stage I over several processes (``accelerate launch`` / torchrun) against one: wall time of
``emcid edit`` for the same requests, on the embedded model, on this machine's CPU cores.

    python benchmarks/scale_out.py [--concepts 16] [--steps 50] [--processes 1,2]

Each process runs one torch thread. The preservation statistics are computed once, before
any timing, and every timed run reads them from that cache; the Stage I cache starts empty
in every run, so each times Stage I (sharded: process ``i`` of ``N`` optimises concepts ``i,
i+N, ...``) plus what every process does alone (loading the model, reading the statistics,
Stage II). The patches of all runs must agree: the script prints the largest difference of
their deltas against the one-process run's. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def write_requests(folder: Path, count: int, seed: int) -> Path:
    """``count`` seeded AICE-like pairs of the embedded world (source: ImageNet-1k, destination:
    a holdout concept)."""
    import random

    from emcid.mini.world import load_concepts

    concepts = load_concepts()
    rng = random.Random(f"scale-out-{seed}")
    sources = rng.sample([c.name for c in concepts if c.split == "imagenet1k"], count)
    destinations = rng.sample([c.name for c in concepts if c.split != "imagenet1k"], count)
    path = folder / "requests.yaml"
    path.write_text(yaml.safe_dump([{"source": s, "destination": d}
                                    for s, d in zip(sources, destinations, strict=True)]))
    return path


def edit(processes: int, requests: Path, out: Path, cache: Path, steps: int, samples: int) -> float:
    """Seconds of one ``emcid edit`` over ``processes`` processes (torchrun, gloo)."""
    env = {**os.environ, "EMCID_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "emcid.cli", "edit", "--requests", str(requests), "--out", str(out),
               "--steps", str(steps), "--device", "cpu", "--stats-samples", str(samples)]
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"emcid edit on {processes} process(es) failed:\n{run.stderr[-3000:]}")
    return seconds


def fresh_cache(root: Path, name: str, statistics: Path) -> Path:
    """A cache folder whose statistics are the warm ones and whose Stage I entries are none."""
    cache = root / name
    cache.mkdir()
    (cache / "stats").symlink_to(statistics, target_is_directory=True)
    return cache


def largest_difference(first: Path, second: Path) -> float:
    from emcid import EditPatch

    a, b = EditPatch.load(first), EditPatch.load(second)
    return max(float((a.deltas[n].dense() - b.deltas[n].dense()).abs().max() /
                     a.deltas[n].dense().abs().max()) for n in a.deltas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="Stage I steps per concept")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--stats-samples", type=int, default=5000,
                        help="captions of the statistics (the embedded model's default 5,000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = [int(x) for x in args.processes.split(",")]
    with tempfile.TemporaryDirectory(prefix="emcid-scale-out-") as temp:
        root = Path(temp)
        requests = write_requests(root, args.concepts, args.seed)
        warm = root / "warm"
        print("statistics (once, not timed) ...", flush=True)
        edit(1, requests, root / "warm.safetensors", warm, 1, args.stats_samples)
        seconds, patches = {}, {}
        for count in counts:
            patches[count] = root / f"p{count}.safetensors"
            cache = fresh_cache(root, f"cache{count}", warm / "stats")
            seconds[count] = edit(count, requests, patches[count], cache, args.steps, args.stats_samples)
            print(f"{count} process(es): {seconds[count]:.1f} s", flush=True)
        differences = {count: largest_difference(patches[counts[0]], patches[count]) for count in counts}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.concepts} concepts, "
          f"{args.steps} Stage I steps, one torch thread per process")
    base = counts[0]
    for count in counts:
        print(f"{count} process(es): {seconds[count]:.1f} s, speed-up {seconds[base] / seconds[count]:.2f} "
              f"against {base}; deltas differ from its by {differences[count]:.1e} (relative, at most)")


if __name__ == "__main__":
    main()
