"""ESD-x: its loss against the paper's equation written out here, what it edits, that it
erases, seeded determinism and interrupt/resume, and its option checks."""

import copy
import math
from dataclasses import asdict

import pytest
import torch
import yaml
from diffusers import DDIMScheduler

import emcid
from emcid.cli import main
from emcid.editors import esd, get_editor
from emcid.editors.esd import ESDConfig, Trainee, esd_loss, sample_latents
from emcid.errors import OptionError

ERASE = [emcid.EditRequest("lobster", "")]
FAST = {"steps": 4, "sample_steps": 4, "lr": 1e-3, "progress": False}
EDITED = ("attn2.to_k", "attn2.to_v")


def _prompts(bundle):
    with torch.no_grad():
        return bundle.encode(["lobster"]), bundle.encode([""])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_matches_the_papers_loss(sd1, prediction_type):
    """L = ||eps'(x_t, c, t) - [eps(x_t, t) - eta (eps(x_t, c, t) - eps(x_t, t))]||^2 (mean), eps
    from v as sqrt(abar) v + sqrt(1 - abar) x_t; theta' here is a copy of the UNet whose to_k /
    to_v weights are W + delta, and its gradient is taken on those weights."""
    sd1.pipeline.scheduler = DDIMScheduler.from_config(sd1.scheduler.config, prediction_type=prediction_type)
    trainee = Trainee(sd1)
    torch.manual_seed(0)
    with torch.no_grad():
        for delta in trainee.deltas.values():
            delta.normal_(std=0.05)
    latents, t, eta = torch.randn(1, 4, 8, 8), torch.tensor(401), 0.7
    concept, empty = _prompts(sd1)
    loss = esd_loss(trainee, latents, t, concept, empty, eta)
    loss.backward()

    abar = sd1.scheduler.alphas_cumprod[401]

    def eps(unet, prompt):
        out = unet(latents, t, encoder_hidden_states=prompt.embeds).sample
        return out if prediction_type == "epsilon" else abar.sqrt() * out + (1 - abar).sqrt() * latents

    with torch.no_grad():
        e_uncond, e_cond = eps(sd1.unet, empty), eps(sd1.unet, concept)
    edited, leaves = copy.deepcopy(sd1.unet), {}
    for name, module in edited.named_modules():
        if name.endswith(EDITED):
            delta = trainee.deltas[f"unet.{name}"].detach()
            module.weight = leaves[f"unet.{name}"] = torch.nn.Parameter(module.weight.detach() + delta)
    want = (eps(edited, concept) - (e_uncond - eta * (e_cond - e_uncond))).pow(2).mean()
    want.backward()
    assert loss.item() > 0 and math.isclose(loss.item(), want.item(), rel_tol=1e-5)
    assert set(leaves) == set(trainee.deltas) and len(leaves) > 0
    for name, leaf in leaves.items():
        got, expected = trainee.deltas[name].grad, leaf.grad
        assert expected.abs().max() > 0, name
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), name


def _weights(bundle) -> dict[str, torch.Tensor]:
    return {f"{component}.{name}": p.detach().clone()
            for component in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(bundle, component) is not None
            for name, p in getattr(bundle, component).named_parameters()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_only_cross_attention_keys_and_values_change(family, request):
    bundle = request.getfixturevalue(family)
    before = _weights(bundle)
    patch = emcid.edit(bundle, ERASE, method="esd", cache=False, **FAST)
    assert patch.metadata["method"] == "esd" and patch.metadata["hparams"]["steps"] == 4
    assert all(torch.equal(w, before[n]) for n, w in _weights(bundle).items())  # computing writes nothing
    projections = {f"unet.{n}" for n, _ in bundle.unet.named_modules() if n.endswith(EDITED)}
    assert set(patch.deltas) == projections and len(projections) > 2
    patch.apply(bundle)
    after = _weights(bundle)
    changed = {n.removesuffix(".weight") for n, w in after.items() if not torch.equal(w, before[n])}
    assert changed == projections


def test_the_erased_prompt_moves_toward_the_guided_target(sd1):
    """After two dozen steps theta' on the erased prompt is far nearer the frozen model's
    negatively guided prediction: the loss on fixed draws of x_t, held out of training, falls."""
    config = ESDConfig(steps=24, lr=1e-3, sample_steps=10, seed=0)
    trainee = Trainee(sd1)
    concept, empty = _prompts(sd1)
    generator = torch.Generator().manual_seed(123)
    draws = [sample_latents(trainee, concept, empty, config, generator) for _ in range(6)]

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(esd_loss(trainee, x, t, concept, empty, 1.0).item() for x, t in draws)

    before = held_out_loss()
    patch = emcid.edit(sd1, ERASE, method="esd", cache=False, progress=False, **asdict(config))
    with torch.no_grad():
        for name, delta in trainee.deltas.items():
            delta.copy_(patch.deltas[name].dense())
    after = held_out_loss()
    assert after < 0.5 * before, (before, after)


def test_seeded_and_resumable(sd1, tmp_path, monkeypatch):
    requests = [*ERASE, emcid.EditRequest("otter", "")]  # two concepts, taking turns: 8 iterations
    whole = emcid.edit(sd1, requests, method="esd", cache=False, **FAST)
    again = emcid.edit(sd1, requests, method="esd", cache=False, **FAST)
    other = emcid.edit(sd1, requests, method="esd", cache=False, seed=1, **FAST)
    whole.save(tmp_path / "whole.safetensors")
    again.save(tmp_path / "again.safetensors")
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    assert any(not torch.equal(other.deltas[n].dense(), d.dense()) for n, d in whole.deltas.items())

    real, calls = esd.esd_loss, {"count": 0, "stop_at": 6}

    def counted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(esd, "esd_loss", counted)
    cache = {"cache_root": str(tmp_path / "cache"), "checkpoint_every": 2}
    with pytest.raises(KeyboardInterrupt):
        emcid.edit(sd1, requests, method="esd", **cache, **FAST)
    progress = tmp_path / "cache" / "esd-progress"
    assert len(list(progress.glob("*.safetensors"))) == 1  # saved after iterations 2 and 4
    calls.update(count=0, stop_at=-1)
    resumed = emcid.edit(sd1, requests, method="esd", **cache, **FAST)
    assert calls["count"] == 4  # iterations 5..8 only
    resumed.save(tmp_path / "resumed.safetensors")
    assert (tmp_path / "resumed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert list(progress.glob("*.safetensors")) == []  # a finished run leaves no progress behind


@pytest.mark.parametrize("option", [
    {"eta": -1.0}, {"eta": math.nan}, {"lr": 0.0}, {"lr": "fast"}, {"steps": 0}, {"steps": 2.5},
    {"seed": -1}, {"seed": 2**64}, {"sample_steps": 0}, {"guidance": math.inf},
    {"concept_batch": 2}, {"colour": "red"}])
def test_bad_options_are_refused_in_one_line(option):
    with pytest.raises(OptionError) as info:
        get_editor("esd", **option)
    assert "\n" not in str(info.value) and next(iter(option)) in str(info.value)


def test_command_line(sd1_dir, tmp_path, capsys):
    requests = tmp_path / "requests.yaml"
    requests.write_text(yaml.safe_dump([{"source": "lobster", "destination": "crab"}]))
    config = tmp_path / "esd.yaml"
    config.write_text(yaml.safe_dump({"sample_steps": 3, "eta": 2.0}))
    out = tmp_path / "p.safetensors"
    base = ["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out", str(out),
            "--method", "esd"]
    assert main([*base, "--steps", "0"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert "steps" in line and not out.exists()
    assert main([*base, "--steps", "2", "--config", str(config), "--no-cache"]) == 0
    patch = emcid.EditPatch.load(out)
    assert patch.metadata["method"] == "esd" and patch.metadata["hparams"]["eta"] == 2.0
    assert all(name.endswith(EDITED) for name in patch.deltas)
