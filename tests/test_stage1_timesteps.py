"""Stage I's ``min_timestep``: the noise prediction loss reads only the late (noisy) timesteps,
the release's draw is unchanged at 0, and a bound past the scheduler is refused before work."""

import pytest
import torch

import emcid
from emcid.cache import TensorCache
from emcid.editors import get_editor
from emcid.editors.emcid.stage1 import Stage1Config, compute_targets, objective, schedule

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
