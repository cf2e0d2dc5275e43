"""Stage I's release conditioning and latents, and the ``release`` profile, against the equations.

The EMCID release's Stage I, for one request: the source prompts padded to the longest of
them and encoded with the attention mask, ``delta`` added to block ``l*``'s output at the
subject token; the destination prompts likewise (padded among themselves) through the
unedited encoder, the teacher. Each source image is flipped left-right where its coin says
so, once; each step draws ``x0 = (mean + std * eps) * scale`` from the VAE posterior, noises
it as DDPM trains, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n``, and the loss is

    mse(unet(x_t, t, edited), unet(x_t, t, teacher)) + 0.01 mse(pooled_edited, pooled_teacher)
        + 5e-4 ||delta|| / ||v||^2

with ``v`` the unedited block-``l*`` state at the subject of the first prompt; Adam at 0.2,
then ``||delta|| <= 1.5 ||v||``. emcid's default is the same with every prompt padded to 77
tokens, no mask, and the posterior mean without a flip. The references below are written from
these equations with the models alone; the coins, timesteps and draws follow the seeding emcid
documents (the concept's generator: the coins, then per step the timesteps, noise and ``eps``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from edit_helpers import interrupt_at_the_end
from PIL import Image

import emcid
from emcid.cache import TensorCache, content_key
from emcid.config import Runtime
from emcid.editors.emcid.stage1 import Stage1Config, cache_key_for, compute_targets, compute_z, schedule
from emcid.errors import OptionError

LAYER = 2
Z_LAYER = {"text_encoder": LAYER}
PROMPTS = ("{}", "a photo of {}", "a painting of a {} on a hill by the sea at night")
RELEASE = {"init": "zero", "conditioning": "release", "latents": "release", "distil_on": "source"}


def _images(folder: Path, count: int, seed: int) -> tuple[str, ...]:
    """Random 16 x 16 reference images (the tiny model's size, so nothing is resized)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return tuple(paths)


def _subject(tokenizer, prompt: str, subject: str) -> int:
    """The index of the subject's last token in the prompt's ids."""
    ids = tokenizer(prompt).input_ids
    word = tokenizer(subject, add_special_tokens=False).input_ids
    start = max(i for i in range(len(ids) - len(word) + 1) if ids[i:i + len(word)] == word)
    return start + len(word) - 1


def _encode(bundle, prompts: list[str], release: bool, delta=None, where=None):
    """Last hidden states and pooled output; ``delta`` added at block LAYER at ``where``."""
    tokenizer, encoder = bundle.tokenizer, bundle.text_encoder
    if release:
        inputs = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    else:
        inputs = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt")
        del inputs["attention_mask"]

    def add(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        bumped = hidden.clone()
        bumped[torch.arange(len(where)), where] += delta
        return (bumped, *output[1:]) if isinstance(output, tuple) else bumped

    block = bundle.slot("text_encoder").block(LAYER)
    handle = block.register_forward_hook(add) if delta is not None else None
    try:
        out = encoder(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    return out.last_hidden_state, out.pooler_output


def _v(bundle, request) -> torch.Tensor:
    """The unedited block-LAYER state at the subject of the request's first prompt."""
    seen = {}
    handle = bundle.slot("text_encoder").block(LAYER).register_forward_hook(
        lambda _m, _i, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            bundle.text_encoder(**bundle.tokenizer(request.source_prompts()[:1], return_tensors="pt"))
    finally:
        handle.remove()
    return seen["h"][0, _subject(bundle.tokenizer, request.source_prompts()[0], request.source)]


def _reference(bundle, request, release: bool, steps: int) -> tuple[torch.Tensor, list[float]]:
    """delta after ``steps`` steps and the loss of every step, from the module's equations."""
    generator = torch.Generator().manual_seed(request.seed)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                          for p in request.reference_images]).permute(0, 3, 1, 2) / 127.5 - 1.0
    if release:
        flip = torch.rand(len(pixels), generator=generator) < 0.5
        pixels = torch.stack([p.flip(-1) if f else p for p, f in zip(pixels, flip)])
    with torch.no_grad():
        posterior = bundle.vae.encode(pixels).latent_dist
        teacher, teacher_pooled = _encode(bundle, request.destination_prompts(), release)
    scale, scheduler = bundle.vae.config.scaling_factor, DDPMScheduler.from_config(bundle.scheduler.config)
    where = [_subject(bundle.tokenizer, p, request.source) for p in request.source_prompts()]
    v = _v(bundle, request)
    delta = torch.zeros_like(v, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=0.2)
    losses = []
    for _ in range(steps):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=generator)
        noise = torch.randn(posterior.mean.shape, generator=generator)
        if release:
            eps = torch.randn(posterior.mean.shape, generator=generator)
            x0 = (posterior.mean + posterior.std * eps) * scale
        else:
            x0 = posterior.mean * scale
        noisy = scheduler.add_noise(x0, noise, t)
        edited, pooled = _encode(bundle, request.source_prompts(), release, delta, where)
        prediction = bundle.unet(noisy, t, encoder_hidden_states=edited).sample
        with torch.no_grad():
            goal = bundle.unet(noisy, t, encoder_hidden_states=teacher).sample
        loss = (torch.nn.functional.mse_loss(prediction, goal)
                + 0.01 * torch.nn.functional.mse_loss(pooled, teacher_pooled)
                + 5e-4 * delta.norm() / v.norm() ** 2)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            if delta.norm() > 1.5 * v.norm():
                delta.mul_(1.5 * v.norm() / delta.norm())
        losses.append(float(loss.detach()))
    return delta.detach(), losses


def _emcid(bundle, requests, steps: int, **options) -> list:
    return compute_z(bundle, requests, Z_LAYER, Stage1Config(steps=steps, **options),
                     TensorCache("release-images", enabled=False))


@pytest.fixture
def request_with_images(tmp_path):
    return emcid.EditRequest("tench", "goldfish", PROMPTS, _images(tmp_path, 3, 0), seed=1)


@pytest.mark.parametrize("release", [True, False], ids=["release", "pipeline"])
def test_stage1_loss_and_steps_follow_the_equations(sd1, request_with_images, release):
    options = RELEASE if release else {"init": "zero", "distil_on": "source"}
    coins = torch.rand(3, generator=torch.Generator().manual_seed(request_with_images.seed)) < 0.5
    assert coins.any() and not coins.all()  # some images flipped, some not
    delta, losses = _reference(sd1, request_with_images, release, steps=3)
    first, = _emcid(sd1, [request_with_images], 1, **options)
    third, = _emcid(sd1, [request_with_images], 3, **options)
    assert first.final_loss == pytest.approx(losses[0], rel=1e-5)
    assert third.final_loss == pytest.approx(losses[2], rel=1e-5)
    assert torch.allclose(third.deltas["text_encoder"], delta, atol=2e-5)
    assert delta.norm() > 0.1


def test_release_conditioning_and_latents_change_the_loss(sd1, request_with_images):
    """Each option on its own moves the loss (the equations above are not the default's)."""
    base = _emcid(sd1, [request_with_images], 1, init="zero")[0].final_loss
    for option in ({"conditioning": "release"}, {"latents": "release"}):
        moved = _emcid(sd1, [request_with_images], 1, init="zero", **option)[0].final_loss
        assert abs(moved - base) > 1e-4 * base, option


def test_release_stage1_does_not_depend_on_the_batch(sd1, tmp_path):
    requests = [emcid.EditRequest("tench", "goldfish", PROMPTS, _images(tmp_path, 3, 0), seed=3),
                emcid.EditRequest("zebra", "horse", seed=4),  # shorter prompts, drawn images
                emcid.EditRequest("castle", "tower", ("{}", "a {} on a hill"), seed=2)]
    together = _emcid(sd1, requests, 4, **RELEASE)
    for request, batched in zip(requests, together, strict=True):
        alone, = _emcid(sd1, [request], 4, **RELEASE)
        assert torch.allclose(alone.deltas["text_encoder"], batched.deltas["text_encoder"], atol=1e-4)
        assert alone.final_loss == pytest.approx(batched.final_loss, rel=1e-5)
        assert alone.deltas["text_encoder"].norm() > 0.1


def test_release_stage1_resumes_bit_identically(sd1, monkeypatch):
    """The coins come before the steps' draws, so a resumed run flips the same images."""
    requests = [emcid.EditRequest("tench", "goldfish", seed=3), emcid.EditRequest("zebra", "horse")]
    config, runtime = Stage1Config(steps=5, **RELEASE), Runtime(checkpoint_every=2)
    expected = compute_targets(sd1, requests, Z_LAYER, config, TensorCache("rp-reference"),
                               progress=False, runtime=runtime)
    cache = TensorCache("rp-resume")
    interrupt_at_the_end(sd1, requests, Z_LAYER, config, cache, runtime, monkeypatch)
    found = compute_targets(sd1, requests, Z_LAYER, config, cache, progress=False, runtime=runtime)
    for a, b in zip(expected, found, strict=True):
        assert torch.equal(a.deltas["text_encoder"], b.deltas["text_encoder"])
        assert a.final_loss == b.final_loss


def test_default_options_keep_the_cache_keys_made_before_them():
    request = emcid.EditRequest("castle", "tower")
    # at the values every key made before these options had, the key is the same
    config = Stage1Config(stop_tolerance=0.0, distil_on="source")
    settings, device = {"height": 32}, torch.device("cpu")
    before = asdict(config)
    for name in ("conditioning", "latents", "stop_tolerance", "stop_window", "min_steps", "min_timestep",
                 "lr_schedule", "distil_on"):
        del before[name]
    assert cache_key_for("m", request, Z_LAYER, config, settings, device) == content_key(
        model="m", request=request.to_dict(), images=[], z_layer=Z_LAYER, config=before,
        image_settings=settings)
    for option in ({"conditioning": "release"}, {"latents": "release"}):
        changed = Stage1Config(stop_tolerance=0.0, distil_on="source", **option)
        assert cache_key_for("m", request, Z_LAYER, changed, settings, device) != \
            cache_key_for("m", request, Z_LAYER, config, settings, device)


def test_a_new_stage1_revision_leaves_the_older_targets_in_the_cache_unread(monkeypatch):
    request, settings, device = emcid.EditRequest("castle", "tower"), {"height": 32}, torch.device("cpu")
    first = cache_key_for("m", request, Z_LAYER, Stage1Config(), settings, device)
    monkeypatch.setattr(schedule, "STAGE1_REVISION", 2)
    assert cache_key_for("m", request, Z_LAYER, Stage1Config(), settings, device) != first


@pytest.mark.parametrize("option", ["conditioning", "latents"])
def test_stage1_refuses_an_unknown_form(option):
    with pytest.raises(OptionError, match=f"{option}='bogus': choose from"):
        Stage1Config(**{option: "bogus"})


def test_the_release_profile_sets_the_release_options_and_the_patch_records_it(tmp_path, sd1_dir):
    import yaml

    from emcid.cli import main
    from emcid.editors import editor_from_patch

    requests = tmp_path / "r.yaml"
    requests.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"}]))
    out = tmp_path / "release.safetensors"
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out", str(out),
                 "--steps", "1", "--stats-samples", "20", "--lam", "1.0", "--layers", "1-2",
                 "--profile", "release"]) == 0
    metadata = emcid.EditPatch.load(out).metadata
    hparams = metadata["hparams"]
    assert hparams["profile"] == "release"
    assert {k: hparams["stage1"][k] for k in RELEASE} == RELEASE
    assert hparams["stage2"]["residual"] == "release"
    assert hparams["stage1"]["steps"] == 1  # options beside the profile still apply
    rebuilt = editor_from_patch(metadata).config
    assert rebuilt.profile == "release" and rebuilt.stage1.conditioning == "release"


def test_profiles_are_checked(sd1, sdxl, tmp_path, sd1_dir, capsys):
    import yaml

    from emcid.cli import main
    from emcid.editors import editor_from_patch, get_editor

    with pytest.raises(OptionError, match="unknown EMCID profile 'bogus'; choose from release"):
        get_editor("emcid", sd1, profile="bogus")
    with pytest.raises(OptionError, match="profile 'release' sets init='zero'; drop init='text'"):
        get_editor("emcid", sd1, profile="release", init="text")
    with pytest.raises(OptionError, match="is exact for sd1, sd2 models, not sdxl"):
        get_editor("emcid", sdxl, profile="release")
    requests = tmp_path / "r.yaml"
    requests.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"}]))
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(requests),
                 "--out", str(tmp_path / "p.safetensors"), "--profile", "bogus"]) != 0
    assert "choose from release" in capsys.readouterr().err
    # Patches made before the options rebuild with emcid's conditioning and latents, no profile.
    metadata = {"method": "emcid", "hparams": get_editor("emcid", sd1).hparams()}
    for key in ("conditioning", "latents"):
        del metadata["hparams"]["stage1"][key]
    del metadata["hparams"]["profile"]
    config = editor_from_patch(metadata).config
    assert (config.profile, config.stage1.conditioning, config.stage1.latents) == (None, "pipeline", "mean")
