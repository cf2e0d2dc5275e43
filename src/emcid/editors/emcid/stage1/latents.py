"""The source images' VAE latents that Stage I noises: the posterior mean, or the release's draws.

``latents="mean"`` (emcid's default): each image's posterior mean, encoded once, so a
concept's result depends only on its request and seed. ``latents="release"``: as the EMCID
release preprocesses, each image is flipped left-right with probability 1/2, once, before the
steps; then every step draws afresh from the VAE posterior, ``mean + std * eps``. The
posterior is still encoded once (a draw needs only its mean and spread), and every coin and
``eps`` comes from the concept's own generator: the coins first, then per step after the
timesteps and the noise, so results do not depend on the batch.
"""

from __future__ import annotations

import torch
from PIL import Image

from ....core.bundle import ModelBundle
from ....core.cache import TensorCache
from ....core.generation import encode_images, generate_cached, pil_to_tensor, resolve_settings
from ....requests.edit import EditRequest
from ..config import Stage1Config


def _reference_images(request: EditRequest, height: int, width: int) -> torch.Tensor:
    images = []
    for path in request.reference_images:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    count = len(request.prompts)
    # Pair images with prompts round-robin, so every prompt sees an image.
    chosen = [images[i % len(images)] for i in range(max(count, len(images)))]
    return pil_to_tensor(chosen, height, width)


def _drawn_images(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                  image_cache: TensorCache, progress: bool) -> torch.Tensor | None:
    """The generated source images of the requests without reference images, uint8, cached."""
    settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                num_inference_steps=config.image_steps)
    drawn = [r for r in requests if not r.reference_images]
    prompts = [p for r in drawn for p in r.source_prompts()]
    seeds = [r.seed + i for r in drawn for i in range(len(r.prompts))]
    return generate_cached(bundle, prompts, seeds, image_cache, progress=progress, **settings) \
        if drawn else None


def draw_source_images(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                       image_cache: TensorCache) -> None:
    """Generate (and cache) the requests' source images with a progress bar, before the batch
    that needs them: drawing thousands of them is Stage I's first silent stretch otherwise."""
    if config.noise_weight:
        _drawn_images(bundle, requests, config, image_cache, progress=True)


def source_pixels(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                  image_cache: TensorCache) -> list[torch.Tensor]:
    """Each request's source images in [-1, 1]: the user's references, or generated once and
    cached (one cache lookup for all requests, so the model is fingerprinted once)."""
    settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                num_inference_steps=config.image_steps)
    arrays = _drawn_images(bundle, requests, config, image_cache, progress=False)
    pixels, start = [], 0
    for request in requests:
        if request.reference_images:
            pixels.append(_reference_images(request, settings["height"], settings["width"]))
        else:
            count = len(request.prompts)
            pixels.append(arrays[start:start + count].permute(0, 3, 1, 2).float() / 127.5 - 1.0)
            start += count
    return pixels


def source_latents(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                   image_cache: TensorCache) -> list[torch.Tensor]:
    """VAE posterior means (scaled) of each request's source images."""
    return [encode_images(bundle, pixels)
            for pixels in source_pixels(bundle, requests, config, image_cache)]


@torch.no_grad()
def release_latents(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                    image_cache: TensorCache, generators: list[torch.Generator]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per request, the scaled VAE posterior mean and standard deviation of its source images,
    each image flipped left-right where its concept's generator's coin says so."""
    means, spreads = [], []
    scale = bundle.vae.config.scaling_factor
    for pixels, generator in zip(source_pixels(bundle, requests, config, image_cache), generators,
                                 strict=True):
        flip = torch.rand(pixels.shape[0], generator=generator) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        posterior = bundle.vae.encode(pixels.to(bundle.device, bundle.dtype)).latent_dist
        means.append(posterior.mean * scale)
        spreads.append(posterior.std * scale)
    return means, spreads


def step_draws(rows: int, shape: torch.Size, generator: torch.Generator, posterior: bool) -> torch.Tensor:
    """One step's diffusion noise for a concept's rows; with ``posterior`` the posterior's
    standard normal draw after it, stacked on axis 1 (so a CUDA graph takes both as one input)."""
    noise = torch.randn((rows, *shape), generator=generator)
    if not posterior:
        return noise
    return torch.stack([noise, torch.randn((rows, *shape), generator=generator)], 1)


def sampled(mean: torch.Tensor, spread: torch.Tensor | None,
            draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's latents and diffusion noise from :func:`step_draws`' ``draws``: the mean
    itself without a ``spread``, else a draw from the posterior."""
    if spread is None:
        return mean, draws
    return mean + spread * draws[:, 1], draws[:, 0]
