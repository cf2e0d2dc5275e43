"""Stage I's ``min_timestep`` (the noise prediction loss reads only the late, noisy timesteps;
the release's draw is unchanged at 0; a bound past the scheduler is refused before work) and
``lr_schedule`` (Adam's rate per step, resumed with the run)."""

import math

import pytest
import torch
from edit_helpers import interrupt_at_the_end

import emcid
from emcid.cache import TensorCache
from emcid.config import Runtime
from emcid.editors import get_editor
from emcid.editors.emcid.stage1 import Stage1Config, compute_targets, engine, objective, schedule

REQUESTS = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("zebra", "horse", seed=4)]
LAYER = {"text_encoder": 2}


def _drawn_timesteps(sd1, monkeypatch, config: Stage1Config, name: str):
    drawn = []
    draw = objective.draw_noise

    def recording(*args, **kwargs):
        timesteps, noise = draw(*args, **kwargs)
        drawn.append(timesteps)
        return timesteps, noise

    monkeypatch.setattr(objective, "draw_noise", recording)
    found = compute_targets(sd1, REQUESTS, LAYER, config, TensorCache(name), progress=False)
    return torch.cat([t.flatten() for t in drawn]), found


def test_min_timestep_draws_only_late_timesteps_and_moves_the_targets(sd1, monkeypatch):
    late, late_targets = _drawn_timesteps(sd1, monkeypatch, Stage1Config(steps=6, min_timestep=900),
                                          "timesteps-late")
    every, targets = _drawn_timesteps(sd1, monkeypatch, Stage1Config(steps=6), "timesteps-all")
    train_steps = sd1.scheduler.config.num_train_timesteps
    assert late.numel() == every.numel() > 0
    assert int(late.min()) >= 900 and int(late.max()) < train_steps
    assert int(every.min()) < 900  # the release's draw reaches the early timesteps
    assert not torch.equal(late_targets[0].deltas["text_encoder"], targets[0].deltas["text_encoder"])


def test_the_release_draw_keeps_its_cache_keys():
    key = schedule.cache_key_for("model", REQUESTS[0], LAYER, Stage1Config(steps=3), {}, torch.device("cpu"))
    assert schedule.cache_key_for("model", REQUESTS[0], LAYER, Stage1Config(steps=3, min_timestep=0), {},
                                  torch.device("cpu")) == key
    assert schedule.cache_key_for("model", REQUESTS[0], LAYER, Stage1Config(steps=3, min_timestep=10), {},
                                  torch.device("cpu")) != key


def test_a_min_timestep_outside_the_schedule_is_refused_before_stage_one(sd1, monkeypatch):
    with pytest.raises(emcid.EmcidError, match="min_timestep"):
        Stage1Config(min_timestep=-1)
    train_steps = sd1.scheduler.config.num_train_timesteps
    editor = get_editor("emcid", min_timestep=train_steps, steps=2)
    monkeypatch.setattr(objective, "compute_z", lambda *a, **k: pytest.fail("Stage I ran"))
    with pytest.raises(emcid.EmcidError, match=f"min_timestep={train_steps}.*0 to {train_steps - 1}"):
        editor.check(sd1)


def test_the_cosine_rate_falls_from_lr_towards_zero():
    rates = [engine.learning_rate(1.2, "cosine", step, 4) for step in range(4)]
    quarter = math.cos(math.pi / 4)
    assert rates == pytest.approx([1.2, 0.6 * (1 + quarter), 0.6, 0.6 * (1 - quarter)])
    assert engine.learning_rate(1.2, "constant", 3, 4) == 1.2


def test_a_scheduled_run_sets_each_steps_rate_and_resumes_bit_for_bit(sd1, monkeypatch):
    config = Stage1Config(steps=6, lr=0.5, lr_schedule="cosine")
    runtime = Runtime(checkpoint_every=4)
    rates = []
    set_rate = engine.set_rate

    def recording(optimiser, value):
        rates.append(value)
        set_rate(optimiser, value)

    monkeypatch.setattr(engine, "set_rate", recording)
    expected = compute_targets(sd1, REQUESTS, LAYER, config, TensorCache("rate-reference"), progress=False,
                               runtime=runtime)
    assert rates == pytest.approx([0.25 * (1 + math.cos(math.pi * s / 6)) for s in range(6)])
    constant = compute_targets(sd1, REQUESTS, LAYER, Stage1Config(steps=6, lr=0.5), TensorCache("rate-flat"),
                               progress=False, runtime=runtime)
    assert not torch.equal(expected[0].deltas["text_encoder"], constant[0].deltas["text_encoder"])
    cache = TensorCache("rate-resume")
    interrupt_at_the_end(sd1, REQUESTS, LAYER, config, cache, runtime, monkeypatch)
    rates.clear()
    found = compute_targets(sd1, REQUESTS, LAYER, config, cache, progress=False, runtime=runtime)
    assert rates == pytest.approx([0.25 * (1 + math.cos(math.pi * s / 6)) for s in (4, 5)])  # from step 4
    for a, b in zip(expected, found, strict=True):
        assert torch.equal(a.deltas["text_encoder"], b.deltas["text_encoder"])


def test_an_unknown_schedule_is_refused():
    with pytest.raises(emcid.EmcidError, match="lr_schedule"):
        Stage1Config(lr_schedule="linear")
