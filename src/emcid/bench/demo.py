"""``emcid demo``: the project's main job in one command, on the embedded model.

It runs a small ICEB (AICE and rectification at a few dozen edits) on the miniature model
that ships with the package, so anyone can see what EMCID does, with numbers and images,
on a laptop CPU in minutes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .iceb import BenchmarkError, run_iceb

log = logging.getLogger(__name__)

DEMO_SCALES = (1, 10, 30)  # a few dozen edits: enough to see scaling, quick on a CPU
DEMO_HOLDOUT = 200  # holdout classes scored (of 1,000): keeps the demo short


def run_demo(out: str | Path = "emcid-demo", device: str = "cpu", seed: int = 0,
             edits: tuple[int, ...] = DEMO_SCALES, progress: bool = True) -> dict:
    """Edit a few dozen classes of the embedded model with EMCID; write results and a report."""
    from ..mini import weights_present

    if not weights_present():
        raise BenchmarkError(
            "the embedded model is not installed (src/emcid/mini/weights is empty); train it with "
            "`emcid mini train` or run ICEB on another model with `emcid bench iceb --model ...`")
    from ..mini import default_model_dir

    return run_iceb(default_model_dir(), method="emcid", edits=edits, out=out, seed=seed, device=device,
                    holdout_eval=DEMO_HOLDOUT, progress=progress)
