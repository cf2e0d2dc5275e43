"""``emcid demo``: the project's main job in one command, on the embedded model.

It runs a small ICEB (AICE and rectification, up to a few dozen edits) on the miniature
model that ships with the package, so anyone can see what EMCID does, with numbers and
images, on a laptop CPU in minutes. To stay that short it works on a seeded sample of the
embedded world (150 editable concepts, 300 holdout concepts); EMCID runs with its release
hyperparameters. `benchmarks/iceb_mini.py` runs the full benchmark.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from .iceb import BenchmarkError, run_iceb

log = logging.getLogger(__name__)

DEMO_SCALES = (1, 10, 30)  # a few dozen edits: enough to see scaling, quick on a CPU
DEMO_POOL = 150  # editable (ImageNet-1k) concepts sampled for the demo
DEMO_HOLDOUT = 300  # holdout (extra) concepts sampled for the demo


def demo_classes(seed: int = 0) -> tuple[int, ...]:
    """A seeded sample of the embedded world: editable concepts plus holdout concepts."""
    from ..mini.world import load_concepts

    concepts = load_concepts()
    rng = random.Random(f"emcid-demo-{seed}")
    editable = [c.index for c in concepts if c.split == "imagenet1k"]
    extra = [c.index for c in concepts if c.split != "imagenet1k"]
    return tuple(sorted(rng.sample(editable, DEMO_POOL) + rng.sample(extra, DEMO_HOLDOUT)))


def run_demo(out: str | Path = "emcid-demo", device: str = "cpu", seed: int = 0,
             edits: tuple[int, ...] = DEMO_SCALES, progress: bool = True) -> dict:
    """Edit a few dozen concepts of the embedded model with EMCID; write results and a report."""
    from ..mini import default_model_dir, weights_present

    if not weights_present():
        raise BenchmarkError(
            "the embedded model is not installed (src/emcid/mini/weights is empty); train it with "
            "`emcid mini train` or run ICEB on another model with `emcid bench iceb --model ...`")
    return run_iceb(default_model_dir(), method="emcid", edits=edits, out=out, seed=seed, device=device,
                    classes=demo_classes(seed), progress=progress)
