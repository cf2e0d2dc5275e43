"""What Stage I tells its user: the concepts its stopping rule never stopped (in the patch and
in the log) and its cost, timed once, only where the step loop already waits for the device."""

import logging

import pytest
import torch

import emcid
from emcid.cache import TensorCache
from emcid.config import Runtime
from emcid.editors import get_editor
from emcid.editors.emcid.stage1 import Stage1Config, compute_targets, engine
from emcid.errors import OptionError
from emcid.tasks.edit import edit_patch

REQUESTS = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("zebra", "horse", seed=4),
            emcid.EditRequest("castle", "tower", ("{}", "a {} on a hill"), seed=2)]
LAYER = {"text_encoder": 2}
# On the tiny model, on the source images alone (the release's), tench and castle settle by step 6
# at this tolerance; zebra does not by step 8.
MIXED = {"steps": 8, "stop_tolerance": 0.001, "stop_window": 2, "min_steps": 2, "distil_on": "source"}
STAGE1 = "emcid.editors.emcid.stage1"


def _targets(bundle, config, name, **runtime):
    return compute_targets(bundle, REQUESTS, LAYER, config, TensorCache(name), progress=False,
                           runtime=Runtime(**runtime))


def _lines(caplog, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name.startswith(STAGE1) and text in r.getMessage()]


def test_a_concept_that_never_meets_the_rule_is_named_in_the_log_and_the_cache(sd1, caplog):
    caplog.set_level(logging.INFO, logger=STAGE1)
    found = _targets(sd1, Stage1Config(**MIXED), "report-mixed")
    assert [(t.steps, t.converged) for t in found] == [(6, True), (8, False), (6, True)]
    [line] = _lines(caplog, logging.WARNING, "without meeting the stopping rule")
    assert "1 of 3 concepts ran all 8 steps" in line and "stop_tolerance 0.001" in line
    assert line.endswith("zebra; more steps may settle them")
    assert "tench" not in line and "castle" not in line
    caplog.clear()
    again = _targets(sd1, Stage1Config(**MIXED), "report-mixed")  # every concept from the cache
    assert [t.converged for t in again] == [True, False, True]
    assert len(_lines(caplog, logging.WARNING, "zebra")) == 1
    assert not _lines(caplog, logging.INFO, "per concept-step")  # no steps ran: nothing timed


@pytest.mark.parametrize("options", [
    {"steps": 3, "stop_window": 2, "min_steps": 4},  # min_steps above steps
    {"steps": 3, "stop_window": 2, "min_steps": 2},  # the second window ends after the last step
    {"steps": 40, "stop_window": 25, "min_steps": 10},
])
def test_a_rule_that_could_stop_nothing_is_refused_in_one_line(options):
    with pytest.raises(OptionError, match=r"the rule stops nothing before step \d+ .*but steps=") as caught:
        Stage1Config(stop_tolerance=0.5, **options)
    assert "\n" not in str(caught.value)
    Stage1Config(stop_tolerance=0.0, **options)  # without the rule the same counts are fine
    with pytest.raises(OptionError, match="min_steps"):
        get_editor("emcid", stop_tolerance=0.1, **options)


def test_the_patch_lists_the_unconverged_sources_only_with_the_rule_on(sd1, caplog):
    options = {"layers": {"text_encoder": [1, 2]}, "stats_samples": 8, "cache": False}
    patch = edit_patch(get_editor("emcid", sd1, **MIXED, **options), sd1, REQUESTS, progress=False)
    assert patch.metadata["stage1_steps"] == [6, 8, 6]
    assert patch.metadata["stage1_unconverged"] == ["zebra"]
    settled = {**MIXED, "stop_tolerance": 0.5}  # every concept stops at its first chance
    patch = edit_patch(get_editor("emcid", sd1, **settled, **options), sd1, REQUESTS[:1],
                       progress=False)
    assert patch.metadata["stage1_unconverged"] == []
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=STAGE1)
    off = {**MIXED, "stop_tolerance": 0.0}
    patch = edit_patch(get_editor("emcid", sd1, **off, **options), sd1, REQUESTS[:1], progress=False)
    assert patch.metadata["stage1_steps"] == [8] and "stage1_unconverged" not in patch.metadata
    assert not _lines(caplog, logging.WARNING, "stopping rule")


@pytest.mark.parametrize("tolerance, bound", [(0.001, "at most about"), (0.0, ": about")])
def test_the_cost_is_logged_once_from_the_first_batch(sd1, caplog, tolerance, bound):
    caplog.set_level(logging.INFO, logger=STAGE1)
    config = Stage1Config(**{**MIXED, "stop_tolerance": tolerance})
    _targets(sd1, config, f"report-cost-{tolerance}", concept_batch=2)
    [line] = _lines(caplog, logging.INFO, "per concept-step")
    assert "on cpu" in line and "3 concepts in 2 batches" in line and bound in line
    assert ("at most 8 steps" in line) == (tolerance > 0)
    # with the rule, timed at its first window (step 2, after the first step's set-up);
    # without, over 5 steps after it
    assert ("timed over 1 step of a batch of 2" if tolerance else "timed over 5 steps") in line


def test_on_cuda_the_clock_is_read_only_where_the_loop_already_waits():
    """On CUDA the host runs ahead of the device: a clock read between two graph replays would
    time the launches, and a sync there would stall them. So only synced points count, and the
    graph's warm-up and capture are left out of what is timed."""
    timed = []
    clock = engine.StepClock(lambda *m: timed.append(m), 3, 0, torch.device("cuda"), graphs=True,
                             at_checks=False)
    for done in range(1, 25):
        clock.tick(done, synced=False, checked=False)
    assert not timed
    clock.tick(25, synced=True, checked=False)  # a progress report: the loop waited here
    assert [m[:2] for m in timed] == [(3, 25 - (engine.Stepper.WARMUP + 1))]
    clock.tick(50, synced=True, checked=False)
    clock.finish(60)
    assert len(timed) == 1  # once a batch

    ended = []
    clock = engine.StepClock(lambda *m: ended.append(m), 2, 0, torch.device("cuda"), graphs=True,
                             at_checks=True)
    for done in range(1, 4):
        clock.tick(done, synced=False, checked=False)
    clock.finish(3)  # a batch shorter than the warm-up: timed whole, at its end
    assert [m[:2] for m in ended] == [(2, 3)]
