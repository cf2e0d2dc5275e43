"""EMCID at Stable Diffusion size, offline: random pipelines with SD 1.4's (or SDXL's) shapes.

    python benchmarks/sd_scale.py [--family sd1|sdxl] [--device cuda] [--edits 100,1000]
        [--batches 1,2,4,8] [--precisions fp32,bf16] [--steps 5] [--stats-samples 2000]

The weights are random, built from configs (no download): the FLOPs and memory are those of
the real models, the edits mean nothing. Prints, one line each:

- Stage I seconds per concept per step and peak memory, per batch size and precision (CUDA
  only: on a CPU this part is skipped with a message);
- statistics throughput (captions/s over the edited blocks);
- Stage II seconds for each number of synthetic edits.

On a CPU only the text encoders are built at full size (the UNet is a stub, Stage I skipped).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import emcid
from emcid.concepts import builtin_caption_corpus, imagenet1k_classes
from emcid.core.bundle import ModelBundle
from emcid.core.cache import TensorCache
from emcid.core.config import Runtime
from emcid.core.family import FAMILY_SAMPLING
from emcid.core.loading import freeze_components
from emcid.core.stats import second_moments
from emcid.editors.emcid.stage1 import ConceptTarget, Stage1Config, compute_z
from emcid.editors.emcid.stage2 import Stage2Config, compute_deltas
from emcid.editors.presets import preset_options, resolve_layers
from emcid.tiny import build_tokenizer

SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
STUB_UNET = dict(  # CPU runs: Stage II and statistics never touch the UNet
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
    norm_num_groups=8, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=512,
)


def _text_encoder(cls, tokenizer, hidden: int, layers: int, heads: int, act: str, projection: int = 0):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=max(49408, len(tokenizer)), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        hidden_act=act, projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return cls(config).eval().requires_grad_(False)


def build_bundle(family: str, device: str, full_unet: bool, captions: list[str]) -> ModelBundle:
    """SD 1.4- or SDXL-shaped random pipeline; the tokenizer holds every word used whole."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    words = " ".join(captions + [c.name for c in imagenet1k_classes()] + ["an image of a photo"])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp), words.split())
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    vae = AutoencoderKL(**SD_VAE) if full_unet else AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    text_encoder = _text_encoder(CLIPTextModel, tokenizer, 768, 12, 12, "quick_gelu")
    if family == "sd1":
        unet = UNet2DConditionModel(**(SD14_UNET if full_unet else STUB_UNET))
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, tokenizer, 1280, 32, 20, "gelu",
                                       projection=1280)
        stub = {**STUB_UNET, "cross_attention_dim": 2048, "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
        unet = UNet2DConditionModel(**(SDXL_UNET if full_unet else stub))
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipeline.to(device)
    freeze_components(pipeline)  # as load_model leaves them
    return ModelBundle(pipeline, family, f"random {family}-shaped", dict(FAMILY_SAMPLING[family]))


def requests_for(count: int) -> list[emcid.EditRequest]:
    classes = imagenet1k_classes()
    return [emcid.EditRequest(classes[i % 1000].name, classes[999 - i % 1000].name, seed=i)
            for i in range(count)]


def time_stage1(bundle: ModelBundle, z_layer: dict[str, int], batches: list[int],
                precisions: list[str], steps: int) -> None:
    """Seconds per concept per step from the difference of a (1 + steps)- and a 1-step run, so
    image generation and the layout are not counted; peak memory of the longer run."""
    images = TensorCache("sd-scale-images", enabled=False)
    # source images: 2 sampling steps (not timed anyway); every step run, as timing needs
    base = Stage1Config(image_steps=2, stop_tolerance=0.0)
    probe = requests_for(max(batches))
    for precision in precisions:
        for batch in batches:
            runtime = Runtime(concept_batch=batch, precision=precision)
            try:
                compute_z(bundle, probe[:batch], z_layer, replace(base, steps=1), images, runtime)
                torch.cuda.synchronize()
                start = time.perf_counter()
                compute_z(bundle, probe[:batch], z_layer, replace(base, steps=1), images, runtime)
                torch.cuda.synchronize()
                one = time.perf_counter() - start
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                compute_z(bundle, probe[:batch], z_layer, replace(base, steps=1 + steps), images, runtime)
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - start - one) / steps / batch
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"Stage I, {precision}, concept_batch {batch}: {seconds:.3f} s per concept per "
                      f"step, peak {peak:.1f} GiB")
            except torch.OutOfMemoryError:
                print(f"Stage I, {precision}, concept_batch {batch}: out of memory")
            torch.cuda.empty_cache()


def synthetic_targets(bundle: ModelBundle, count: int, z_layer: dict[str, int]) -> list[ConceptTarget]:
    """Stage I results with random values (Stage II's cost does not depend on them)."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for request in requests_for(count):
        widths = {name: bundle.slot(name).hidden_size for name in z_layer}
        targets.append(ConceptTarget(
            request, dict(z_layer),
            {n: torch.randn(w, generator=generator) for n, w in widths.items()},
            {n: torch.randn(len(request.prompts), w, generator=generator) for n, w in widths.items()},
            0.0))
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--edits", default="100,1000")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=5, help="timed Stage I steps per run")
    parser.add_argument("--stats-samples", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("EMCID_CACHE", tempfile.mkdtemp(prefix="emcid-sd-scale-"))
    on_cuda = args.device.startswith("cuda")
    captions = builtin_caption_corpus(args.stats_samples)
    bundle = build_bundle(args.family, args.device, on_cuda, captions)
    device = torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine()
    print(f"{args.family}-shaped random pipeline on {device}; {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    spec = preset_options(("emcid",), bundle, "object")["layers"]
    layers = {slot: resolve_layers(given, bundle.slot(slot).num_layers) for slot, given in spec.items()}
    z_layer = {slot: max(indices) for slot, indices in layers.items()}
    names = [bundle.slot(s).fc2_name(i) for s, indices in layers.items() for i in indices]

    if on_cuda:
        time_stage1(bundle, z_layer, [int(b) for b in args.batches.split(",")],
                    args.precisions.split(","), args.steps)
    else:
        print("Stage I: skipped (needs a CUDA device; on a CPU one SD-size step takes minutes)")

    start, cpu = time.perf_counter(), time.process_time()
    moments = second_moments(bundle, names, captions, len(captions),
                             cache=TensorCache("sd-scale-stats", enabled=False), progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"statistics: {len(captions) / seconds:.1f} captions/s over {len(names)} blocks "
          f"({len(captions) / cpu:.1f} per CPU second)")

    counts = sorted(int(e) for e in args.edits.split(","))
    targets = synthetic_targets(bundle, max(counts), z_layer)
    for count in counts:
        start, cpu = time.perf_counter(), time.process_time()
        compute_deltas(bundle, targets[:count], layers, moments, Stage2Config(), progress=False)
        if on_cuda:
            torch.cuda.synchronize()
        print(f"Stage II, {count} edits over {len(names)} blocks: {time.perf_counter() - start:.1f} s "
              f"({time.process_time() - cpu:.1f} s of CPU time)")


if __name__ == "__main__":
    main()
