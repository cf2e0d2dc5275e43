import numpy as np
import torch

from emcid.cache import TensorCache
from emcid.generation import encode_images, generate, generate_arrays, generate_cached, generation_batch


def test_images_depend_on_seed_not_on_batching(sd1):
    prompts, seeds = ["a photo of tench", "zebra", "castle"], [3, 4, 5]
    together = generate_arrays(sd1, prompts, seeds, progress=False)
    alone = generate_arrays(sd1, prompts[1:2], seeds[1:2], progress=False)
    batched_by_one = generate_arrays(sd1, prompts, seeds, batch_size=1, progress=False)
    assert together.shape == (3, 16, 16, 3) and together.dtype == torch.uint8
    assert torch.equal(together[1], alone[0])
    assert torch.equal(together, batched_by_one)
    other_seed = generate_arrays(sd1, prompts[1:2], [99], progress=False)
    assert not torch.equal(other_seed[0], alone[0])


def test_generate_returns_pil_with_overrides(sd1):
    images = generate(sd1, ["tench"], [0], num_inference_steps=2, guidance_scale=1.0, progress=False)
    assert images[0].size == (16, 16)
    assert np.asarray(images[0]).dtype == np.uint8


def test_sdxl_images_depend_on_seed_not_on_batching(sdxl):
    images = generate_arrays(sdxl, ["tench", ""], [0, 1], progress=False)
    assert images.shape == (2, 16, 16, 3)
    assert torch.equal(images, generate_arrays(sdxl, ["tench", ""], [0, 1], batch_size=1, progress=False))
    assert torch.equal(images[1], generate_arrays(sdxl, [""], [1], progress=False)[0])


def test_cached_generation_generates_each_image_once(sd1, monkeypatch):
    from emcid.core import generation

    calls = []
    original = generation.generate_arrays
    monkeypatch.setattr(generation, "generate_arrays",
                        lambda b, p, *a, **k: calls.append(len(p)) or original(b, p, *a, **k))
    cache = TensorCache("images-test")
    first = generate_cached(sd1, ["a", "b"], [0, 1], cache, progress=False)
    second = generate_cached(sd1, ["b", "c", "a"], [1, 2, 0], cache, progress=False)
    assert calls == [2, 1]  # only "c" was new the second time
    assert torch.equal(second[0], first[1]) and torch.equal(second[2], first[0])


def test_encode_images_is_deterministic(sd1):
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = encode_images(sd1, pixels)
    assert latents.shape == (2, 4, 8, 8)
    assert torch.equal(latents, encode_images(sd1, pixels))


class _Placed:
    """What generation_batch reads of a bundle: its device and its VAE's downscaling."""

    def __init__(self, device: str):
        self.device = torch.device(device)

    def latent_scale(self) -> int:
        return 8  # SD's VAE


def test_generation_batch_holds_as_many_latent_pixels_on_cuda_as_64_sd1_images():
    cuda, cpu = _Placed("cuda"), _Placed("cpu")
    assert generation_batch(cuda, {"height": 512, "width": 512}) == 64  # SD 1.x
    assert generation_batch(cuda, {"height": 768, "width": 768}) == 28  # SD 2.x
    assert generation_batch(cuda, {"height": 1024, "width": 1024}) == 16  # SDXL
    assert generation_batch(cuda, {"height": 64, "width": 64}) == 512  # small models: capped
    assert generation_batch(cpu, {"height": 64, "width": 64}) == 64  # elsewhere always 64
