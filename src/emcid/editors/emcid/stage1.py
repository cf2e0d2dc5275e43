"""Stage I: per-concept target values by dual self-distillation (docs/method.md, Stage I).

For one request, a vector ``delta`` per edited text encoder is added to the output of its
last edited block ``l*`` at the subject token of every source prompt. ``delta`` is optimised
so that the edited encoder on the source prompts makes (1) the UNet predict what the
unedited model predicts on the destination prompts, on the same noisy latents of source
images, and (2) the pooled text output match the unedited encoder's on the destination.
No weight changes here; the result is the target ``z = h + delta`` at ``l*`` per prompt.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler
from PIL import Image

from ...cache import TensorCache, content_key
from ...config import check_choice, check_float, check_int
from ...errors import Stage1DivergedError
from ...generation import encode_images, generate_cached, pil_to_tensor, resolve_settings
from ...hooks import add_at_positions, capture, replay_prefix
from ...models import ModelBundle, PromptEncoding
from ...requests import EditRequest, subject_positions


@dataclass
class Stage1Config:
    """Stage I hyperparameters; defaults are the release values for SD 1.x (docs/method.md).

    Presets for SDXL and artists live in ``emcid.editors.presets``.
    """

    steps: int = 200  # release: 200 (100 for artists, 100 for SDXL)
    lr: float = 0.2  # release: Adam 0.2 (SDXL 0.1)
    noise_weight: float = 1.0  # release: weight of the diffusion noise prediction loss
    align_weight: float = 0.01  # release: 0.01 for SD 1.x, 0.005 for SDXL
    norm_decay: float = 5e-4  # release: 5e-4 * ||delta|| / ||v_src||^2
    clamp_factor: float = 1.5  # release: ||delta|| <= 1.5 ||v_src|| (SDXL 1.2)
    target: Literal["teacher", "noise"] = "teacher"  # "noise": regress on the true noise
    image_guidance_scale: float | None = 7.5  # release: source images at guidance 7.5
    image_steps: int | None = 50  # release: 50 sampling steps; None = the model's default

    def __post_init__(self) -> None:
        check_int("Stage I", "steps", self.steps)
        check_float("Stage I", "lr", self.lr, low=0, low_open=True)
        for name in ("noise_weight", "align_weight", "norm_decay"):
            check_float("Stage I", name, getattr(self, name), low=0)
        check_float("Stage I", "clamp_factor", self.clamp_factor, low=0, low_open=True)
        check_choice("Stage I", "target", self.target, ("teacher", "noise"))
        if self.image_guidance_scale is not None:
            check_float("Stage I", "image_guidance_scale", self.image_guidance_scale, low=0)
        if self.image_steps is not None:
            check_int("Stage I", "image_steps", self.image_steps)


@dataclass
class ConceptTarget:
    """Stage I's result for one request, per edited text encoder (by component name)."""

    request: EditRequest
    z_layer: dict[str, int]
    deltas: dict[str, torch.Tensor]  # (width,)
    source_hidden: dict[str, torch.Tensor]  # unedited h at l*, (n_prompts, width)
    final_loss: float

    def targets(self, slot: str) -> torch.Tensor:
        """z = h + delta at l* for every source prompt: (n_prompts, width)."""
        return self.source_hidden[slot] + self.deltas[slot]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"delta.{k}": v for k, v in self.deltas.items()}
        tensors.update({f"hidden.{k}": v for k, v in self.source_hidden.items()})
        tensors["final_loss"] = torch.tensor(self.final_loss)
        return tensors

    @classmethod
    def from_tensors(cls, request: EditRequest, z_layer: dict[str, int],
                     tensors: dict[str, torch.Tensor]) -> ConceptTarget:
        return cls(
            request, z_layer,
            {k: tensors[f"delta.{k}"] for k in z_layer},
            {k: tensors[f"hidden.{k}"] for k in z_layer},
            float(tensors["final_loss"]),
        )


def _reference_images(request: EditRequest, height: int, width: int) -> torch.Tensor:
    images = []
    for path in request.reference_images:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    count = len(request.prompts)
    # Pair images with prompts round-robin, so every prompt sees an image.
    chosen = [images[i % len(images)] for i in range(max(count, len(images)))]
    return pil_to_tensor(chosen, height, width)


def source_latents(bundle: ModelBundle, request: EditRequest, config: Stage1Config,
                   image_cache: TensorCache) -> torch.Tensor:
    """VAE latents of the source images: the user's references, or generated once and cached."""
    settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                num_inference_steps=config.image_steps)
    if request.reference_images:
        pixels = _reference_images(request, settings["height"], settings["width"])
    else:
        prompts = request.source_prompts()
        seeds = [request.seed + i for i in range(len(prompts))]
        arrays = generate_cached(bundle, prompts, seeds, image_cache, progress=False, **settings)
        pixels = arrays.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return encode_images(bundle, pixels)


def _read_block_outputs(bundle: ModelBundle, prompts: list[str], z_layer: dict[str, int],
                        positions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Unedited outputs of every edited encoder's block l*: at the subject token of each
    prompt (``positions``), or every token (``None``, what Stage I replays)."""
    with torch.no_grad(), ExitStack() as stack:
        records = {
            name: stack.enter_context(capture(
                {name: bundle.slot(name).block(layer)}, None if positions is None else positions[name]))
            for name, layer in z_layer.items()
        }
        bundle.encode(prompts)
    return {name: records[name][name][0].float() for name in z_layer}


def cache_key_for(bundle_fingerprint: str, request: EditRequest, z_layer: dict[str, int],
                  config: Stage1Config, image_settings: dict) -> str:
    """Everything a Stage I result depends on: model, request (prompts, seed, images), config."""
    images = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in request.reference_images]
    return content_key(model=bundle_fingerprint, request=request.to_dict(), images=images,
                       z_layer=z_layer, config=asdict(config), image_settings=image_settings)


@dataclass
class _Batch:
    """Several concepts' rows laid out as one tensor program (one row per source image)."""

    requests: list[EditRequest]
    owner: torch.Tensor  # concept index of each row
    src_prompts: list[str]
    dst_prompts: list[str]
    positions: dict[str, torch.Tensor]  # subject token of each row, per text encoder
    latents: torch.Tensor | None  # None when the noise-prediction loss is off
    hidden: dict[str, list[torch.Tensor]]  # per concept: unedited h at l*, (n_prompts, width)


def _layout(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
            config: Stage1Config, image_cache: TensorCache) -> _Batch:
    owner, src, dst, latents = [], [], [], []
    positions: dict[str, list[torch.Tensor]] = {name: [] for name in z_layer}
    hidden: dict[str, list[torch.Tensor]] = {name: [] for name in z_layer}
    for index, request in enumerate(requests):
        prompt_positions = {
            name: subject_positions(bundle.slot(name).tokenizer, request.prompts, request.source)
            for name in z_layer
        }
        read = _read_block_outputs(bundle, request.source_prompts(), z_layer, prompt_positions)
        if config.noise_weight:
            latents.append(source_latents(bundle, request, config, image_cache))
            rows = torch.arange(latents[-1].shape[0]) % len(request.prompts)
        else:  # text-only targets need no images
            rows = torch.arange(len(request.prompts))
        owner += [index] * len(rows)
        src += [request.source_prompts()[i] for i in rows]
        dst += [request.destination_prompts()[i] for i in rows]
        for name in z_layer:
            positions[name].append(prompt_positions[name][rows])
            hidden[name].append(read[name])
    return _Batch(requests, torch.tensor(owner), src, dst,
                  {n: torch.cat(p) for n, p in positions.items()},
                  torch.cat(latents) if latents else None, hidden)


def _per_concept_mean(values: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of per-row values within each concept: (count,)."""
    sums = torch.zeros(count, dtype=values.dtype, device=values.device)
    sums.index_add_(0, owner.to(values.device), values)
    return sums / torch.bincount(owner, minlength=count).to(values)


def _draw_noise(batch: _Batch, generators: list[torch.Generator], steps: int):
    """Timesteps and noise per row, each concept from its own generator (batch-independent)."""
    timesteps, noise = [], []
    for index, generator in enumerate(generators):
        rows = int((batch.owner == index).sum())
        timesteps.append(torch.randint(0, steps, (rows,), generator=generator))
        noise.append(torch.randn((rows, *batch.latents.shape[1:]), generator=generator))
    return torch.cat(timesteps), torch.cat(noise).to(batch.latents)


def _noise_loss(bundle: ModelBundle, scheduler, latents: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor, edited: PromptEncoding, teacher: PromptEncoding,
                target: str) -> torch.Tensor:
    """Per-row MSE between the UNet's prediction under the edited conditioning and the
    unedited model's prediction under the destination's (or the true noise / velocity)."""
    settings = resolve_settings(bundle)
    size = (settings["height"], settings["width"])
    noisy = scheduler.add_noise(latents, noise, t)
    prediction = bundle.unet(noisy, t, encoder_hidden_states=edited.embeds,
                             **bundle.unet_kwargs(edited, *size)).sample
    with torch.no_grad():
        if target == "noise":
            is_v = scheduler.config.prediction_type == "v_prediction"
            goal = scheduler.get_velocity(latents, noise, t) if is_v else noise
        else:
            goal = bundle.unet(noisy, t, encoder_hidden_states=teacher.embeds,
                               **bundle.unet_kwargs(teacher, *size)).sample
    return (prediction.float() - goal.float()).pow(2).flatten(1).mean(1)


def compute_z(
    bundle: ModelBundle,
    requests: list[EditRequest],
    z_layer: dict[str, int],
    config: Stage1Config,
    image_cache: TensorCache,
) -> list[ConceptTarget]:
    """Optimise every request's ``delta`` (the paper's dual self-distillation), side by side.

    Concepts are independent: each has its own delta, loss terms, noise generator, norm
    clamp and Adam state (Adam is element-wise), so batching them changes nothing but speed.
    """
    batch = _layout(bundle, requests, z_layer, config, image_cache)
    count, owner = len(requests), batch.owner
    v_norm = {name: torch.stack([h[0].norm() for h in rows]).to(bundle.device)  # release: 1st prompt
              for name, rows in batch.hidden.items()}
    with torch.no_grad():
        teacher = bundle.encode(batch.dst_prompts)
        teacher_pooled = [p.float() for p in teacher.pooled]
    prefix = _read_block_outputs(bundle, batch.src_prompts, z_layer)
    deltas = {name: torch.zeros(count, rows[0].shape[-1], device=bundle.device, requires_grad=True)
              for name, rows in batch.hidden.items()}
    optimiser = torch.optim.Adam(list(deltas.values()), lr=config.lr)
    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    # Training-time noising is DDPM's whatever the sampler (Euler's add_noise only accepts
    # timesteps of an inference schedule and skips the alpha scaling the UNet expects).
    scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    losses = torch.zeros(count)
    for step in range(config.steps):
        with ExitStack() as stack:
            for name, layer in z_layer.items():
                slot = bundle.slot(name)
                stack.enter_context(replay_prefix([slot.block(i) for i in range(layer + 1)], prefix[name]))
                stack.enter_context(add_at_positions(slot.block(layer), batch.positions[name],
                                                     deltas[name][owner]))
            edited = bundle.encode(batch.src_prompts)
        row_loss = torch.zeros(len(batch.src_prompts), device=bundle.device)
        if batch.latents is not None:
            t, noise = _draw_noise(batch, generators, scheduler.config.num_train_timesteps)
            row_loss = config.noise_weight * _noise_loss(bundle, scheduler, batch.latents, noise,
                                                         t.to(bundle.device), edited, teacher,
                                                         config.target)
        if config.align_weight:
            for edited_pooled, target_pooled in zip(edited.pooled, teacher_pooled):
                align = (edited_pooled.float() - target_pooled).pow(2).mean(1)
                row_loss = row_loss + config.align_weight * align
        losses = _per_concept_mean(row_loss, owner, count)
        for name, delta in deltas.items():
            losses = losses + config.norm_decay * delta.norm(dim=1) / v_norm[name] ** 2
        bad = ~torch.isfinite(losses)
        if bad.any():
            failed = requests[int(bad.nonzero()[0])]
            raise Stage1DivergedError(
                f"Stage I diverged for {failed.source!r} -> {failed.destination!r} at step "
                f"{step}: the loss is not finite; lower the learning rate (--lr) or check the model"
            )
        optimiser.zero_grad()
        losses.sum().backward()
        optimiser.step()
        with torch.no_grad():
            for name, delta in deltas.items():
                limit = config.clamp_factor * v_norm[name]
                norms = delta.norm(dim=1)
                delta.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms)).unsqueeze(1))
    final = losses.detach().cpu()
    return [
        ConceptTarget(request, dict(z_layer),
                      {n: d[i].detach().float().cpu() for n, d in deltas.items()},
                      {n: rows[i].cpu() for n, rows in batch.hidden.items()}, float(final[i]))
        for i, request in enumerate(requests)
    ]


def compute_targets(
    bundle: ModelBundle,
    requests: list[EditRequest],
    z_layer: dict[str, int],
    config: Stage1Config,
    cache: TensorCache | None = None,
    image_cache: TensorCache | None = None,
    progress: bool = True,
    concept_batch: int = 8,
) -> list[ConceptTarget]:
    """Stage I for every request, each independent and cached under its full content key.

    ``concept_batch`` concepts are optimised side by side (speed only: results do not change).
    """
    from tqdm.auto import tqdm

    cache = cache or TensorCache("stage1")
    image_cache = image_cache or TensorCache("images")
    model = bundle.fingerprint()
    image_settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                      num_inference_steps=config.image_steps)
    results: dict[int, ConceptTarget] = {}
    keys = [cache_key_for(model, r, z_layer, config, image_settings) for r in requests]
    for index, key in enumerate(keys):
        entry = cache.load(key)
        if entry is not None:
            results[index] = ConceptTarget.from_tensors(requests[index], z_layer, entry[0])
    missing = [i for i in range(len(requests)) if i not in results]
    chunks = [missing[i:i + concept_batch] for i in range(0, len(missing), concept_batch)]
    with tqdm(total=len(missing), desc="Stage I", unit="concept", disable=not progress) as bar:
        for chunk in chunks:
            targets = compute_z(bundle, [requests[i] for i in chunk], z_layer, config, image_cache)
            for index, target in zip(chunk, targets):
                cache.save(keys[index], target.to_tensors(),
                           {"source": target.request.source, "destination": target.request.destination})
                results[index] = target
            bar.update(len(chunk))
    return [results[i] for i in range(len(requests))]
