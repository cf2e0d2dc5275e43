"""Batched, seeded sampling shared by everything that draws images.

Each image's initial noise comes from its own seed, and sampling uses DDIM (deterministic),
so an image depends only on (model, prompt, seed, settings), never on how prompts were
batched. Generated images can be cached by exactly that key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .cache import TensorCache, content_key
from .models import ModelBundle, PromptEncoding

SETTINGS = ("num_inference_steps", "guidance_scale", "height", "width")


def resolve_settings(bundle: ModelBundle, **overrides: object) -> dict:
    """The model's sampling defaults with any non-None override applied."""
    settings = dict(bundle.sampling)
    settings.update({k: v for k, v in overrides.items() if v is not None and k in SETTINGS})
    return settings


def _unconditional(bundle: ModelBundle, count: int, negative_prompt: str) -> PromptEncoding:
    encoding = bundle.encode([negative_prompt] * count)
    zero_empty = bundle.family == "sdxl" and not negative_prompt and getattr(
        bundle.pipeline.config, "force_zeros_for_empty_prompt", False
    )
    if zero_empty:  # SDXL's pipeline conditions unconditional branches on zeros
        encoding = PromptEncoding(
            torch.zeros_like(encoding.embeds),
            [torch.zeros_like(p) for p in encoding.pooled],
            torch.zeros_like(encoding.added_text_embeds),
        )
    return encoding


def _cat(first: PromptEncoding, second: PromptEncoding) -> PromptEncoding:
    added = None
    if first.added_text_embeds is not None:
        added = torch.cat([first.added_text_embeds, second.added_text_embeds])
    return PromptEncoding(torch.cat([first.embeds, second.embeds]), [], added)


def initial_noise(bundle: ModelBundle, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    scale = bundle.latent_scale()
    shape = (bundle.unet.config.in_channels, height // scale, width // scale)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(bundle.device, bundle.dtype)


@torch.no_grad()
def sample_latents(
    bundle: ModelBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: dict,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Denoise one batch with classifier-free guidance; returns clean latents."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(bundle.scheduler.config)
    scheduler.set_timesteps(settings["num_inference_steps"], device=bundle.device)
    height, width, guidance = settings["height"], settings["width"], settings["guidance_scale"]
    conditional = bundle.encode(list(prompts))
    use_guidance = guidance > 1.0
    if use_guidance:
        conditional = _cat(_unconditional(bundle, len(prompts), negative_prompt), conditional)
    extra = bundle.unet_kwargs(conditional, height, width)
    latents = initial_noise(bundle, seeds, height, width) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if use_guidance else latents
        model_input = scheduler.scale_model_input(model_input, t)
        prediction = bundle.unet(model_input, t, encoder_hidden_states=conditional.embeds, **extra).sample
        if use_guidance:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance * (cond - uncond)
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents


@torch.no_grad()
def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> uint8 images (batch, height, width, 3)."""
    images = bundle.vae.decode(latents / bundle.vae.config.scaling_factor).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu()


def generate_arrays(
    bundle: ModelBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 64,
    progress: bool = True,
    negative_prompt: str = "",
    **overrides: object,
) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair: uint8 tensor (n, height, width, 3)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    settings = resolve_settings(bundle, **overrides)
    chunks = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2):
        stop = start + batch_size
        latents = sample_latents(bundle, prompts[start:stop], seeds[start:stop], settings,
                                 negative_prompt)
        chunks.append(decode_latents(bundle, latents))
    if not chunks:
        return torch.zeros(0, settings["height"], settings["width"], 3, dtype=torch.uint8)
    return torch.cat(chunks)


def to_pil(arrays: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a.numpy()) for a in arrays]


def generate(
    bundle: ModelBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
    **overrides: object,
) -> list[Image.Image]:
    """Generate one PIL image per (prompt, seed) pair with the model's sampling defaults."""
    arrays = generate_arrays(
        bundle, prompts, seeds, batch_size, progress,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **overrides,
    )
    return to_pil(arrays)


def generate_cached(
    bundle: ModelBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cache: TensorCache,
    batch_size: int = 64,
    progress: bool = True,
    **overrides: object,
) -> torch.Tensor:
    """Like :func:`generate_arrays`, but each image is cached by model, prompt, seed, settings.

    Only the missing images are generated, so a sweep over scales draws each pre-edit image
    once. Returns uint8 (n, height, width, 3).
    """
    settings = resolve_settings(bundle, **overrides)
    model = bundle.fingerprint()
    keys = [content_key(model=model, prompt=p, seed=int(s), **settings) for p, s in zip(prompts, seeds)]
    found: dict[int, torch.Tensor] = {}
    for i, key in enumerate(keys):
        entry = cache.load(key)
        if entry is not None:
            found[i] = entry[0]["image"]
    missing = [i for i in range(len(keys)) if i not in found]
    if missing:
        fresh = generate_arrays(
            bundle, [prompts[i] for i in missing], [seeds[i] for i in missing], batch_size,
            progress, **settings,
        )
        for i, image in zip(missing, fresh):
            cache.save(keys[i], {"image": image}, {"prompt": prompts[i], "seed": seeds[i]})
            found[i] = image
    if not keys:
        return generate_arrays(bundle, [], [], **settings)
    return torch.stack([found[i] for i in range(len(keys))])


def pil_to_tensor(images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], (n, 3, height, width), resized to the model."""
    arrays = [
        np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
        for img in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def encode_images(bundle: ModelBundle, images: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled VAE latents (the posterior mean, so it is deterministic)."""
    posterior = bundle.vae.encode(images.to(bundle.device, bundle.dtype)).latent_dist
    return posterior.mean * bundle.vae.config.scaling_factor
