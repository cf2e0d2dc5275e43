"""What a Stage I run tells its user in the log: its cost, measured on the first batch and
projected over all batches before most of it is spent, and the concepts that ran every step
without meeting the stopping rule (their ``steps`` were too few to settle; docs/method.md,
"Stage I's steps").
"""

from __future__ import annotations

import logging
import math

from ..config import Stage1Config
from ..targets import ConceptTarget

log = logging.getLogger(__name__)

NAMED = 10  # unconverged concepts named in the warning; the rest are counted


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural where it is not 1 (nouns in -ch take -es)."""
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{count} {noun if count == 1 else plural}"


def duration(seconds: float) -> str:
    """``seconds`` in the unit a person reads them in."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def log_cost(config: Stage1Config, device: str, measured: tuple[int, int, float], batch_size: int,
             groups: list[tuple[int, int]]) -> None:
    """One INFO line: seconds per concept-step, and the steps' time for every batch to come.

    ``measured``: (concepts in the timed batch, steps timed, seconds); ``groups``: per group of
    concepts resuming from one step, (concepts, that step). Each batch is charged a full
    batch's step at every step up to ``steps`` (a smaller batch is no slower per step; a step
    timed on fewer than ``batch_size`` concepts is scaled up in proportion), so, up to timing
    noise, it bounds the steps' time from above: early stops only shorten it. It does not
    count each batch's set-up (tokenising, teacher passes, graph capture) or a batch halved
    after an out-of-memory error.
    """
    concepts, steps, seconds = measured
    per_step = seconds / steps
    full_step = per_step * max(1.0, batch_size / concepts)
    batches = sum(math.ceil(count / batch_size) for count, _ in groups)
    batch_steps = sum(math.ceil(count / batch_size) * (config.steps - start) for count, start in groups)
    total = sum(count for count, _ in groups)
    early = config.stop_tolerance > 0
    log.info("Stage I: %.3g s per concept-step on %s (timed over %s of a batch of %d); %s in %s "
             "x %s%d steps: %s%s%s", per_step / concepts, device, counted(steps, "step"), concepts,
             counted(total, "concept"), counted(batches, "batch"), "at most " if early else "",
             config.steps, "at most about " if early else "about ", duration(batch_steps * full_step),
             " (concepts that meet the stopping rule stop earlier)" if early else "")


def unconverged(targets: list[ConceptTarget]) -> list[ConceptTarget]:
    """Targets that ran all their steps under the stopping rule without meeting it."""
    return [t for t in targets if t.converged is False]


def log_unconverged(config: Stage1Config, targets: list[ConceptTarget]) -> None:
    """One WARNING line naming the concepts the rule never stopped (none: no line)."""
    found = unconverged(targets)
    if not found:
        return
    names = ", ".join(t.request.source for t in found[:NAMED])
    more = f" and {len(found) - NAMED} more" if len(found) > NAMED else ""
    log.warning("Stage I: %d of %d concepts ran all %d steps without meeting the stopping rule "
                "(stop_tolerance %g): %s%s; more steps may settle them", len(found), len(targets),
                config.steps, config.stop_tolerance, names, more)
