"""The embedded model's parts and its export: builders shared by training and tests.

Every part is a stock diffusers/transformers class, so the exported folder is a plain
``StableDiffusionPipeline`` that SD tooling (and ``emcid.load_model``) reads unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ..core.folders import replace_folder


@dataclass
class SamplingDefaults:
    """Recommended generation settings, written to emcid.json."""

    num_inference_steps: int = 8  # 8 DDIM steps judged as well as 10-15 (docs/mini.md)
    guidance_scale: float = 3.0  # 3.0 >= 2.0 > 1.5 in the sweep
    height: int = 32
    width: int = 32


#: Editor settings the embedded model carries in its emcid.json (`emcid.editors.presets`
#: reads them): its own sampler settings stand in for SD's guidance 7.5 / 50 steps in Stage I's
#: source images; its small UNet is fastest on a CPU with 64 concepts per Stage I batch; and its
#: statistics converge within 1.6 % at 5,000 captions of its small vocabulary (docs/mini.md).
EDITOR_OVERRIDES: dict[str, dict] = {
    "emcid": {"image_guidance_scale": None, "image_steps": None, "cpu_concept_batch": 64,
              "stats_samples": 5000},
    "refact": {"stats_samples": 5000},
}


def build_vae(channels: tuple[int, ...], latent_channels: int = 8) -> AutoencoderKL:
    """AutoencoderKL with len(channels)-1 downsamplings (3 levels: 32 -> 8).

    No attention in the mid block: it costs time and solid shapes do not need it.
    """
    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def build_unet(
    channels: tuple[int, ...], cross_dim: int, latent_channels: int = 8, sample_size: int = 8
) -> UNet2DConditionModel:
    """UNet2DConditionModel; no attention at the finest level (cost), cross-attention below."""
    n = len(channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_dim,
        attention_head_dim=32,
        norm_num_groups=16,
    )


def scheduler_kwargs() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
    )


def build_scheduler() -> DDIMScheduler:
    """DDIM with SD's betas, v-prediction, and the fields the pipeline checks."""
    return DDIMScheduler(**scheduler_kwargs(), set_alpha_to_one=False)


def assemble_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    """A stock StableDiffusionPipeline from the parts (no safety checker)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(
    pipe: StableDiffusionPipeline,
    folder: Path,
    sampling: SamplingDefaults,
    tokenizer_dir: Path | None = None,
    half_text_encoder: bool = False,
    tasks: list[str] | None = None,
) -> None:
    """save_pretrained (safetensors) plus emcid.json with the sampling defaults (and ``tasks``:
    what the UNet draws beyond the world's objects, e.g. ["colour_words"]).

    The fast tokenizer saves only tokenizer.json; CLIP's vocab.json + merges.txt from
    `tokenizer_dir` replace it, so the shipped files are the CLIP-format ones.
    ``half_text_encoder`` stores the text encoder in float16 (half the package size);
    pass it only for weights that are float16-exact (training rounds them so), since
    ``emcid.load_model`` loads them back as float32.
    """
    def write(tmp: Path) -> None:
        if half_text_encoder:
            pipe.text_encoder.to(torch.float16)
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            pipe.text_encoder.to(torch.float32)
        if half_text_encoder:  # stored as float16, loaded as float32 by stock from_pretrained too
            config_file = tmp / "text_encoder" / "config.json"
            config = {**json.loads(config_file.read_text()), "dtype": "float32"}
            config_file.write_text(json.dumps(config, indent=2))
        if tokenizer_dir is not None:
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(tokenizer_dir / name, tmp / "tokenizer" / name)
            (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        settings = {**asdict(sampling), "world": "mini", "editor_overrides": EDITOR_OVERRIDES,
                    **({"tasks": tasks} if tasks else {})}
        (tmp / "emcid.json").write_text(json.dumps(settings, indent=1))

    replace_folder(folder, write)
