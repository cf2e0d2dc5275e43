"""Stage I: per-concept target values by dual self-distillation (method.md section 4).

For one request, a vector ``delta`` per edited text encoder is added to the output of its
last edited block ``l*`` at the subject token of every source prompt. ``delta`` is optimised
so that the edited encoder on the source prompts makes (1) the UNet predict what the
unedited model predicts on the destination prompts, on the same noisy latents of source
images, and (2) the pooled text output match the unedited encoder's on the destination.
No weight changes here; the result is the target ``z = h + delta`` at ``l*`` per prompt.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

from ...cache import TensorCache, content_key
from ...errors import Stage1DivergedError
from ...generation import encode_images, generate_cached, pil_to_tensor, resolve_settings
from ...hooks import add_at_positions, capture_at_positions
from ...models import ModelBundle
from ...requests import EditRequest, subject_positions

log = logging.getLogger(__name__)


@dataclass
class Stage1Config:
    """Stage I hyperparameters; defaults are the release values for SD 1.x (method.md 4.2)."""

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
        if self.steps < 1 or self.lr <= 0:
            raise ValueError("Stage I needs steps >= 1 and lr > 0")
        if self.target not in ("teacher", "noise"):
            raise ValueError(f"target must be 'teacher' or 'noise', not {self.target!r}")


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
                        positions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hidden = {}
    with torch.no_grad(), ExitStack() as stack:
        records = {
            name: stack.enter_context(capture_at_positions(
                {name: bundle.slot(name).block(layer)}, positions[name]))
            for name, layer in z_layer.items()
        }
        bundle.encode(prompts)
    for name in z_layer:
        hidden[name] = records[name][name][0].float()
    return hidden


def cache_key_for(bundle_fingerprint: str, request: EditRequest, z_layer: dict[str, int],
                  config: Stage1Config, image_settings: dict) -> str:
    """Everything a Stage I result depends on: model, request (prompts, seed, images), config."""
    images = []
    for path in request.reference_images:
        with open(path, "rb") as handle:
            images.append(content_key(data=handle.read().hex()))
    return content_key(model=bundle_fingerprint, request=request.to_dict(), images=images,
                       z_layer=z_layer, config=asdict(config), image_settings=image_settings)


def compute_z(
    bundle: ModelBundle,
    request: EditRequest,
    z_layer: dict[str, int],
    config: Stage1Config,
    image_cache: TensorCache,
) -> ConceptTarget:
    """Optimise ``delta`` for one request (the paper's dual self-distillation)."""
    src_prompts, dst_prompts = request.source_prompts(), request.destination_prompts()
    positions = {name: subject_positions(bundle.slot(name).tokenizer, request.prompts, request.source)
                 for name in z_layer}
    hidden = _read_block_outputs(bundle, src_prompts, z_layer, positions)
    v_norm = {name: h[0].norm() for name, h in hidden.items()}  # release: first prompt's norm
    latents = source_latents(bundle, request, config, image_cache)
    count = latents.shape[0]
    prompt_index = torch.arange(count) % len(src_prompts)
    src_prompts = [src_prompts[i] for i in prompt_index]
    dst_prompts = [dst_prompts[i] for i in prompt_index]
    positions = {name: p[prompt_index] for name, p in positions.items()}
    settings = resolve_settings(bundle)
    with torch.no_grad():
        teacher = bundle.encode(dst_prompts)
        teacher_pooled = [p.float() for p in teacher.pooled]
    deltas = {name: torch.zeros(h.shape[-1], device=bundle.device, requires_grad=True)
              for name, h in hidden.items()}
    optimiser = torch.optim.Adam(list(deltas.values()), lr=config.lr)
    generator = torch.Generator().manual_seed(request.seed)
    scheduler = bundle.scheduler
    steps = scheduler.config.num_train_timesteps
    loss = torch.tensor(0.0)
    for step in range(config.steps):
        t = torch.randint(0, steps, (count,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        noisy = scheduler.add_noise(latents, noise, t.to(latents.device))
        t = t.to(bundle.device)
        with ExitStack() as stack:
            for name, layer in z_layer.items():
                stack.enter_context(add_at_positions(bundle.slot(name).block(layer),
                                                     positions[name], deltas[name]))
            edited = bundle.encode(src_prompts)
        unet_extra = bundle.unet_kwargs(edited, settings["height"], settings["width"])
        prediction = bundle.unet(noisy, t, encoder_hidden_states=edited.embeds, **unet_extra).sample
        with torch.no_grad():
            if config.target == "noise":
                is_v = scheduler.config.prediction_type == "v_prediction"
                goal = scheduler.get_velocity(latents, noise, t) if is_v else noise
            else:
                goal = bundle.unet(noisy, t, encoder_hidden_states=teacher.embeds,
                                   **bundle.unet_kwargs(teacher, settings["height"],
                                                        settings["width"])).sample
        loss = config.noise_weight * F.mse_loss(prediction.float(), goal.float())
        if config.align_weight:
            align = sum(F.mse_loss(e.float(), t_) for e, t_ in zip(edited.pooled, teacher_pooled))
            loss = loss + config.align_weight * align
        for name, delta in deltas.items():
            loss = loss + config.norm_decay * delta.norm() / v_norm[name] ** 2
        if not torch.isfinite(loss):
            raise Stage1DivergedError(
                f"Stage I diverged for {request.source!r} -> {request.destination!r} at step "
                f"{step}: loss is {loss.item()}; lower the learning rate (--lr) or check the model"
            )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            for name, delta in deltas.items():
                limit = config.clamp_factor * v_norm[name]
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    return ConceptTarget(
        request, dict(z_layer), {n: d.detach().float().cpu() for n, d in deltas.items()},
        {n: h.cpu() for n, h in hidden.items()}, float(loss.detach()),
    )


def compute_targets(
    bundle: ModelBundle,
    requests: list[EditRequest],
    z_layer: dict[str, int],
    config: Stage1Config,
    cache: TensorCache | None = None,
    image_cache: TensorCache | None = None,
    progress: bool = True,
) -> list[ConceptTarget]:
    """Stage I for every request, each independent and cached under its full content key."""
    from tqdm.auto import tqdm

    cache = cache or TensorCache("stage1")
    image_cache = image_cache or TensorCache("images")
    model = bundle.fingerprint()
    image_settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                      num_inference_steps=config.image_steps)
    results = []
    for request in tqdm(requests, desc="Stage I", unit="concept", disable=not progress):
        key = cache_key_for(model, request, z_layer, config, image_settings)
        entry = cache.load(key)
        if entry is not None:
            results.append(ConceptTarget.from_tensors(request, z_layer, entry[0]))
            continue
        target = compute_z(bundle, request, z_layer, config, image_cache)
        cache.save(key, target.to_tensors(), {"source": request.source,
                                             "destination": request.destination})
        results.append(target)
    return results
