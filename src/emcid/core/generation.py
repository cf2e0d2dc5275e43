"""Batched, seeded sampling shared by everything that draws images.

Sampling is the stock diffusers pipeline of the model's family, fed our prompt embeddings.
Each image's initial noise comes from its own seed, and sampling uses DDIM (deterministic),
so an image depends only on (model, prompt, seed, settings), never on how prompts were
batched. Generated images can be cached by exactly that key.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import OptionError
from .bundle import ModelBundle
from .cache import TensorCache, content_key
from .config import check_float, check_int

SETTINGS = ("num_inference_steps", "guidance_scale", "height", "width")
MAX_SEED = 2**63 - 1  # int64: a range every seed path accepts (torch tensors overflow beyond it)


def check_settings(settings: dict) -> None:
    """Refuse sampling settings that would fail late or silently (NaN guidance turns CFG off)."""
    steps, guidance = settings.get("num_inference_steps"), settings.get("guidance_scale")
    if steps is not None:
        check_int("sampling", "steps", steps)
    if guidance is not None:
        check_float("sampling", "guidance", guidance, low=0)
    for name in ("height", "width"):
        if settings.get(name) is not None:
            check_int("sampling", name, settings[name], minimum=8)


class Repeated(Sequence[str]):
    """One prompt ``count`` times, without a list of ``count`` strings (``generate -n 10**8``)."""

    def __init__(self, prompt: str, count: int):
        self.prompt, self.count = prompt, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.prompt] * len(range(*index.indices(self.count)))
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return self.prompt


def check_seeds(seeds: Sequence[int]) -> None:
    if isinstance(seeds, range):  # a run of consecutive seeds: its ends decide
        seeds = [seeds[0], seeds[-1]] if len(seeds) else []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise OptionError(f"seed {seed!r}: give an integer in 0..{MAX_SEED} (2^63 - 1)")


def resolve_settings(bundle: ModelBundle, **overrides: object) -> dict:
    """The model's sampling defaults with any non-None override applied (checked)."""
    settings = dict(bundle.sampling)
    settings.update({k: v for k, v in overrides.items() if v is not None and k in SETTINGS})
    check_settings(settings)
    return settings


def stock_pipeline(bundle: ModelBundle):
    """The bundle's own diffusers pipeline class on the same modules, with a DDIM scheduler.

    DDIM is deterministic, so an image depends on its seed alone; the stock pipeline takes
    our prompt embeddings (encoded exactly as Stage I's teacher sees them), one generator per
    image, and does classifier-free guidance and SDXL's added conditioning itself.
    """
    from diffusers import DDIMScheduler

    pipeline = bundle.pipeline
    # Built from the components (not from_pipe, which casts the shared modules' dtype).
    components = {**pipeline.components, "scheduler": DDIMScheduler.from_config(pipeline.scheduler.config)}
    if "requires_safety_checker" in inspect.signature(type(pipeline)).parameters:
        components["requires_safety_checker"] = False  # emcid loads SD pipelines without one
    stock = type(pipeline)(**components)
    stock.set_progress_bar_config(disable=True)
    return stock


@torch.no_grad()
def sample_latents(stock, bundle: ModelBundle, prompts: Sequence[str], seeds: Sequence[int],
                   settings: dict, negative_prompt: str = "") -> torch.Tensor:
    """Denoise one batch with the stock pipeline; returns clean latents.

    Initial noise comes from one CPU generator per image, as (1, C, h, w) draws, so an image
    never depends on what it is batched with. An empty negative prompt is left to the
    pipeline (SDXL conditions its unconditional branch on zeros, as its config says).
    """
    encoding = bundle.encode(list(prompts))
    extra = {} if bundle.family != "sdxl" else {"pooled_prompt_embeds": encoding.added_text_embeds}
    return stock(
        prompt_embeds=encoding.embeds,
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        output_type="latent",
        **settings,
        **extra,
    ).images


@torch.no_grad()
def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> uint8 images (batch, height, width, 3)."""
    images = bundle.vae.decode(latents / bundle.vae.config.scaling_factor).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu()


def generation_batch(bundle: ModelBundle, settings: dict) -> int:
    """Images per generation batch: 64; on CUDA as many latent pixels as 64 SD 1.x images
    (at most 512), since a small model is launch-bound on a GPU at 64."""
    if bundle.device.type != "cuda":
        return 64
    scale = bundle.latent_scale()
    pixels = (settings["height"] // scale) * (settings["width"] // scale)
    return max(1, min(512, 64 * 64 * 64 // pixels))


def generate_batches(
    bundle: ModelBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int | None = None,
    progress: bool = True,
    negative_prompt: str = "",
    **overrides: object,
) -> Iterator[torch.Tensor]:
    """One uint8 tensor (batch, height, width, 3) per batch of (prompt, seed) pairs, as made."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    check_seeds(seeds)
    settings = resolve_settings(bundle, **overrides)
    batch_size = generation_batch(bundle, settings) if batch_size is None else batch_size
    check_int("generation", "batch_size", batch_size)
    if not prompts:
        return
    stock = stock_pipeline(bundle)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2):
        stop = start + batch_size
        latents = sample_latents(stock, bundle, prompts[start:stop], seeds[start:stop], settings,
                                 negative_prompt)
        yield decode_latents(bundle, latents)


def generate_arrays(
    bundle: ModelBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int | None = None,
    progress: bool = True,
    negative_prompt: str = "",
    **overrides: object,
) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair: uint8 tensor (n, height, width, 3)."""
    chunks = list(generate_batches(bundle, prompts, seeds, batch_size, progress, negative_prompt,
                                   **overrides))
    if not chunks:
        settings = resolve_settings(bundle, **overrides)
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
    batch_size: int | None = None,
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
    batch_size: int | None = None,
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
