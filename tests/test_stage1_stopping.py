"""Stage I's stopping rule: a concept's result is its delta at the step it stopped, whatever
shares its batch, an interrupted run resumes it bit for bit, and the patch records the steps."""

import pytest
import torch
from edit_helpers import interrupt_at_the_end

import emcid
from emcid.cache import TensorCache
from emcid.config import Runtime
from emcid.editors import get_editor
from emcid.editors.emcid.stage1 import Stage1Config, compute_targets, schedule
from emcid.tasks.edit import edit_patch

REQUESTS = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("zebra", "horse", seed=4),
            emcid.EditRequest("castle", "tower", ("{}", "a {} on a hill"), seed=2)]
LAYER = {"text_encoder": 2}


def _targets(bundle, config, name, requests=REQUESTS, **runtime):
    return compute_targets(bundle, requests, LAYER, config, TensorCache(name), progress=False,
                           runtime=Runtime(**runtime))


def test_a_stopped_concept_keeps_its_delta_at_the_stop_and_the_batch_ends(sd1, monkeypatch):
    # tolerance 0.99: any window that does not fall by 99 % stops, so all stop at min_steps
    config = Stage1Config(steps=12, stop_tolerance=0.99, stop_window=2, min_steps=4)
    fixed = _targets(sd1, Stage1Config(steps=4), "stop-fixed")
    steps_run = []
    compute_z = schedule.compute_z

    def counting(bundle, requests, z_layer, cfg, *args, **kwargs):
        found = compute_z(bundle, requests, z_layer, cfg, *args, **kwargs)
        steps_run.append(max(t.steps for t in found))
        return found

    monkeypatch.setattr(schedule, "compute_z", counting)
    stopped = _targets(sd1, config, "stop-early")
    assert [t.steps for t in stopped] == [4, 4, 4] and steps_run == [4]
    for a, b in zip(stopped, fixed, strict=True):
        assert torch.equal(a.deltas["text_encoder"], b.deltas["text_encoder"])
        assert a.final_loss == b.final_loss
    assert [t.steps for t in fixed] == [4, 4, 4]


def test_stopping_does_not_depend_on_the_batch(sd1):
    config = Stage1Config(steps=12, stop_tolerance=0.05, stop_window=2, min_steps=2)
    together = _targets(sd1, config, "stop-together", concept_batch=3)
    alone = _targets(sd1, config, "stop-alone", concept_batch=1)
    assert [t.steps for t in together] == [t.steps for t in alone]
    assert len({t.steps for t in together}) > 1  # the batch held concepts that stopped apart
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a.deltas["text_encoder"], b.deltas["text_encoder"], atol=1e-5)


def test_an_interrupted_run_resumes_its_stopped_concepts(sd1, monkeypatch):
    config = Stage1Config(steps=12, stop_tolerance=0.001, stop_window=2, min_steps=2)
    runtime = Runtime(concept_batch=3, checkpoint_every=8)
    expected = _targets(sd1, config, "stop-resume-reference", concept_batch=3, checkpoint_every=8)
    # some concepts stopped before the checkpoint at step 8 and one ran on past it
    assert min(t.steps for t in expected) < 8 < max(t.steps for t in expected)
    cache = TensorCache("stop-resume")
    interrupt_at_the_end(sd1, REQUESTS, LAYER, config, cache, runtime, monkeypatch)
    found = compute_targets(sd1, REQUESTS, LAYER, config, cache, progress=False, runtime=runtime)
    for a, b in zip(expected, found, strict=True):
        assert torch.equal(a.deltas["text_encoder"], b.deltas["text_encoder"]) and a.steps == b.steps
        assert a.converged == b.converged  # the rule's state resumed too
    assert [t.converged for t in found] == [t.steps < 12 for t in found]


def test_off_the_options_leave_the_cache_keys_made_before_them(sd1):
    config = Stage1Config(steps=3, stop_tolerance=0.0)
    key = schedule.cache_key_for("model", REQUESTS[0], LAYER, config, {}, torch.device("cpu"))
    # inert while the rule is off
    changed = Stage1Config(steps=3, stop_tolerance=0.0, stop_window=5, min_steps=2)
    assert schedule.cache_key_for("model", REQUESTS[0], LAYER, changed, {}, torch.device("cpu")) == key
    on = Stage1Config(steps=3, stop_tolerance=0.01, stop_window=1, min_steps=2)
    assert schedule.cache_key_for("model", REQUESTS[0], LAYER, on, {}, torch.device("cpu")) != key
    assert [t.steps for t in _targets(sd1, config, "stop-off")] == [3, 3, 3]


@pytest.mark.parametrize("options, message", [
    ({"stop_tolerance": 1.0}, "stop_tolerance"),
    ({"stop_tolerance": -0.1}, "stop_tolerance"),
    ({"stop_window": 0}, "stop_window"),
    ({"min_steps": 0}, "min_steps"),
])
def test_bad_stopping_values_are_refused(options, message):
    with pytest.raises(emcid.EmcidError, match=message):
        Stage1Config(**options)


def test_every_step_by_default_in_emcid_the_release_memit_and_older_patches():
    """The rule is opt-in: 0.1 halved the colour-word edits of TIMED's analogue (docs/method.md)."""
    from emcid.editors import editor_from_patch
    from emcid.editors.emcid.config import EMCIDConfig

    assert Stage1Config().stop_tolerance == 0.0
    assert get_editor("emcid").config.stage1.stop_tolerance == 0.0
    assert EMCIDConfig.from_dict({"profile": "release"}).stage1.stop_tolerance == 0.0
    assert get_editor("memit").config.stage1.stop_tolerance == 0.0
    older = EMCIDConfig().to_dict()
    del older["stage1"]["stop_tolerance"]  # a patch written before the option
    rebuilt = editor_from_patch({"method": "emcid", "task": "object", "hparams": older})
    assert rebuilt.config.stage1.stop_tolerance == 0.0


def test_the_patch_records_the_steps_each_concept_took(sd1):
    editor = get_editor("emcid", sd1, steps=6, stop_tolerance=0.99, stop_window=2, min_steps=2,
                              layers={"text_encoder": [1, 2]}, stats_samples=8, cache=False)
    patch = edit_patch(editor, sd1, REQUESTS[:2], progress=False)
    # the first window only sets the baseline: the earliest stop is at the second
    assert patch.metadata["stage1_steps"] == [4, 4]
