"""`emcid demo` end to end, timed: prints the demo's metrics table and its wall-clock seconds.

    python benchmarks/demo_timing.py [--out runs/demo] [--threads 2]

Run it with an empty ``$EMCID_CACHE`` to measure what a new user waits (statistics, source
images and Stage I included); the README's demo figures come from this script. A fixed torch
workload (float32 matmuls and a small convolution stack, the demo's kinds of work) is timed
seven times before the demo and seven times after, and the median of the fourteen is the
reference, so that figures taken on different days or machines can be compared as ratios to
it (before 2026-12-07 the mean of one run before and one after, which moved by a quarter
between two runs of one day). ``--profile`` runs the demo under ``cProfile`` and
prints the functions that took the most time (slower: no timing then).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import statistics
import tempfile
import time

import torch


def workload_once() -> float:
    """Seconds for a fixed, seeded torch workload at the current thread count."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=generator)
    images = torch.randn(8, 64, 32, 32, generator=generator)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(100):
            a = torch.tanh(a @ a.T / 512)
            images = torch.tanh(conv(images))
    return time.perf_counter() - started


def reference_workload(repeats: int = 7) -> list[float]:
    """The fixed workload's seconds, ``repeats`` times: one run moved by a quarter between two
    runs of one day, so the figure compared is a median."""
    return [workload_once() for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (our machines have 2 cores)")
    parser.add_argument("--profile", action="store_true",
                        help="run under cProfile and print the 40 costliest calls (cumulative)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("EMCID_CACHE", tempfile.mkdtemp(prefix="emcid-demo-"))
    from emcid.bench.demo import run_demo
    from emcid.bench.report import summary_table

    reference = reference_workload()
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    results = run_demo(args.out, progress=False)
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - started
    reference = sorted(reference + reference_workload())
    median = statistics.median(reference)
    print(summary_table(results, "emcid"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"cache {os.environ['EMCID_CACHE']}")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    print(f"emcid demo: {seconds:.0f} s; the fixed workload: {median:.3f} s (median of {len(reference)} "
          f"runs, before and after; {reference[0]:.3f} to {reference[-1]:.3f}); ratio {seconds / median:.0f}")


if __name__ == "__main__":
    main()
