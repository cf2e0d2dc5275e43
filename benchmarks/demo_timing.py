"""`emcid demo` end to end, timed: prints the demo's metrics table and its wall-clock seconds.

    python benchmarks/demo_timing.py [--out runs/demo] [--threads 2]

Run it with an empty ``$EMCID_CACHE`` to measure what a new user waits (statistics, source
images and Stage I included); the README's demo figures come from this script.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (our machines have 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("EMCID_CACHE", tempfile.mkdtemp(prefix="emcid-demo-"))
    from emcid.bench.demo import run_demo
    from emcid.bench.report import summary_table

    started = time.perf_counter()
    results = run_demo(args.out, progress=False)
    seconds = time.perf_counter() - started
    print(summary_table(results, "emcid"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"cache {os.environ['EMCID_CACHE']}")
    print(f"emcid demo: {seconds:.0f} s")


if __name__ == "__main__":
    main()
