"""The images' VAE latents that Stage I noises: the posterior mean, or the release's draws.

Whose images (``distil_on``): the source's (the release), the destination's (drawn by the
unedited model from the destination prompts, with the same seeds), or both, each a row of its
own (:mod:`.objective`).

``latents="mean"`` (emcid's default): each image's posterior mean, encoded once, so a
concept's result depends only on its request and seed. ``latents="release"``: as the EMCID
release preprocesses, each image is flipped left-right with probability 1/2, once, before the
steps; then every step draws afresh from the VAE posterior, ``mean + std * eps``. The
posterior is still encoded once (a draw needs only its mean and spread), and every coin and
``eps`` comes from the concept's own generator: the coins first, then per step after the
timesteps and the noise, so results do not depend on the batch. :class:`Noising` noises them
as DDPM trains.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _generated(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
               image_cache: TensorCache, progress: bool, side: str) -> torch.Tensor | None:
    """The generated images (uint8, cached) of one side's prompts: the source's, for requests
    without reference images, or the destination's, for every request (the unedited model draws
    the destination, whatever stands for the source)."""
    settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                num_inference_steps=config.image_steps)
    drawn = [r for r in requests if side == "destination" or not r.reference_images]
    prompts = [p for r in drawn
               for p in (r.source_prompts() if side == "source" else r.destination_prompts())]
    seeds = [r.seed + i for r in drawn for i in range(len(r.prompts))]
    return generate_cached(bundle, prompts, seeds, image_cache, progress=progress, **settings) \
        if drawn else None


def image_sides(config: Stage1Config) -> tuple[str, ...]:
    """Whose images Stage I noises: the source's (the release), the destination's, or both,
    the source's first (so a concept's first rows are its prompts' source rows)."""
    if not config.noise_weight:
        return ()
    return ("source", "destination") if config.distil_on == "both" else (config.distil_on,)


def draw_images(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                image_cache: TensorCache) -> None:
    """Generate (and cache) the images Stage I distils on with a progress bar, before the batch
    that needs them: drawing thousands of them is Stage I's first silent stretch otherwise."""
    for side in image_sides(config):
        _generated(bundle, requests, config, image_cache, True, side)


def image_pixels(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                 image_cache: TensorCache, side: str = "source") -> list[torch.Tensor]:
    """Each request's images of one side in [-1, 1]: the user's references (source side), or
    generated once and cached (one cache lookup for all requests, so the model is fingerprinted
    once), one per prompt."""
    settings = resolve_settings(bundle, guidance_scale=config.image_guidance_scale,
                                num_inference_steps=config.image_steps)
    arrays = _generated(bundle, requests, config, image_cache, False, side)
    pixels, start = [], 0
    for request in requests:
        if side == "source" and request.reference_images:
            pixels.append(_reference_images(request, settings["height"], settings["width"]))
        else:
            count = len(request.prompts)
            pixels.append(arrays[start:start + count].permute(0, 3, 1, 2).float() / 127.5 - 1.0)
            start += count
    return pixels


def image_latents(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                   image_cache: TensorCache, side: str = "source") -> list[torch.Tensor]:
    """VAE posterior means (scaled) of each request's images of one side."""
    return [encode_images(bundle, pixels)
            for pixels in image_pixels(bundle, requests, config, image_cache, side)]


@torch.no_grad()
def release_latents(bundle: ModelBundle, pixels: list[torch.Tensor], generators: list[torch.Generator]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per request, the scaled VAE posterior mean and standard deviation of its images
    (``pixels``), each image flipped left-right where its concept's generator's coin says so."""
    means, spreads = [], []
    scale = bundle.vae.config.scaling_factor
    for images, generator in zip(pixels, generators, strict=True):
        flip = torch.rand(images.shape[0], generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        posterior = bundle.vae.encode(images.to(bundle.device, bundle.dtype)).latent_dist
        means.append(posterior.mean * scale)
        spreads.append(posterior.std * scale)
    return means, spreads


def side_latents(bundle: ModelBundle, requests: list[EditRequest], config: Stage1Config,
                 image_cache: TensorCache, generators: list[torch.Generator], side: str
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per request, one side's image latents (posterior means) and, for drawn latents, their spread."""
    if config.latents == "mean":
        return image_latents(bundle, requests, config, image_cache, side), None
    return release_latents(bundle, image_pixels(bundle, requests, config, image_cache, side), generators)


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


@dataclass
class Noising:
    """DDPM's training-time noising with its tables on the device once (no copy per step)."""

    alphas: torch.Tensor
    velocity: bool

    @classmethod
    def of(cls, scheduler, device: torch.device, dtype: torch.dtype) -> Noising:
        return cls(scheduler.alphas_cumprod.to(device, dtype),
                   scheduler.config.prediction_type == "v_prediction")

    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alphas[t]
        return (alpha ** 0.5).view(-1, 1, 1, 1), ((1 - alpha) ** 0.5).view(-1, 1, 1, 1)
