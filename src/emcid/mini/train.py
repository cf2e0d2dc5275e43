"""`emcid mini train`: one seeded, resumable command that builds the embedded model.

Stages (each writes its result under `out/work/` and is skipped on --resume when done):

1. tokenizer: CLIP-format BPE on the world's text.
2. text encoder: CLIPTextModel with SD 1.x's editing geometry (12 blocks, 3,072-wide
   ``fc2`` inputs), pretrained to name -> signature at the subject and end-of-text tokens,
   then frozen (as in SD); checkpointed, so an interrupt loses at most a few minutes.
3. VAE: a small AutoencoderKL, 32x32x3 <-> 8x8x8 latents (factor 4, SD has 8; so the
   UNet works on 64 positions: cheap enough for the sampling-throughput bar).
4. judge: the world's classifier (also evaluates the UNet during training).
5. conditioning: the frozen encoder's states of a fixed bank of training prompts, computed
   once (the encoder costs more than the UNet step it would feed), in resumable chunks.
6. task bank (only with ``task_rate`` > 0): the frozen encoder's states and the VAE latents of
   seeded examples of the world's style and colour-word prompts (mini/styles.py).
7. UNet: UNet2DConditionModel, v-prediction, classifier-free guidance dropout, EMA weights;
   the states after the subject are often replaced by those of the empty prompt or of
   another prompt, and padding by the empty prompt's, so that the UNet reads the prompt's
   own tokens and treats padding as SD does (docs/mini.md); checkpoints every few minutes.
8. export: a StableDiffusionPipeline folder (safetensors) + emcid.json, and the judge.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import judge as judge_mod
from .build import assemble_pipeline, build_unet, save_pipeline
from .training.banks import (  # noqa: F401 (this module's names before the split)
    ConditioningBank,
    TaskBank,
    augment_conditioning,
    bank_prompts,
    encode_bank,
    stage_conditioning,
    stage_task_bank,
    task_conditioning,
    vae_latents,
)
from .training.config import REUSABLE_STAGES, MiniTrainConfig
from .training.stages import (  # noqa: F401
    copy_stages,
    stage_judge,
    stage_style_encoder,
    stage_text_encoder,
    stage_tokenizer,
    stage_vae,
)
from .training.unet import evaluate_pipeline, sample_images, stage_unet, warm_start  # noqa: F401

log = logging.getLogger(__name__)


def train_mini(
    out_dir: str | Path,
    cfg: MiniTrainConfig | None = None,
    resume: bool = False,
    reuse_from: str | Path | None = None,
    reuse_stages: tuple[str, ...] = REUSABLE_STAGES,
) -> Path:
    """Run every stage; returns the exported pipeline folder.

    Without --resume an existing work folder is an error, so runs are never mixed.
    ``reuse_from`` (an earlier run's ``work`` folder) supplies finished ``reuse_stages``.
    """
    cfg = cfg or MiniTrainConfig()
    if cfg.unet_init is not None:  # refused now, not after the stages before the UNet's
        warm_start(build_unet(cfg.unet_channels, cfg.text.hidden_size, cfg.vae_latent_channels),
                   Path(cfg.unet_init))
    out = Path(out_dir)
    work = out / "work"
    if work.exists() and not resume:
        raise FileExistsError(f"{work} exists; pass resume=True (--resume) to continue it")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    if reuse_from is not None:
        copy_stages(work, Path(reuse_from), reuse_stages)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tok = stage_tokenizer(work, cfg)
    text_encoder = stage_text_encoder(work, cfg, tok)
    log.info("stage text encoder done at %.1f min", (time.time() - t0) / 60)
    if cfg.style.steps:
        text_encoder = stage_style_encoder(work, cfg, tok, text_encoder)
        log.info("stage style encoder done at %.1f min", (time.time() - t0) / 60)
    bank = judge_mod.render_bank(cfg.n_variants, seed=cfg.seed)
    vae = stage_vae(work, cfg, bank)
    log.info("stage vae done at %.1f min", (time.time() - t0) / 60)
    judge = stage_judge(work, cfg)
    log.info("stage judge done at %.1f min", (time.time() - t0) / 60)
    latents = encode_bank(vae, bank)
    del bank
    conditioning = stage_conditioning(work, cfg, tok, text_encoder)
    log.info("stage conditioning done at %.1f min", (time.time() - t0) / 60)
    tasks = stage_task_bank(work, cfg, tok, text_encoder, vae) if cfg.task_rate else None
    unet, finished = stage_unet(work, out, cfg, tok, text_encoder, vae, latents, conditioning, judge,
                                tasks)
    log.info("stage unet %s at %.1f min", "done" if finished else "paused", (time.time() - t0) / 60)
    pipe = assemble_pipeline(vae, text_encoder, tok, unet)
    save_pipeline(pipe, out / "pipeline", cfg.sampling, work / "tokenizer", half_text_encoder=True,
                  tasks=cfg.draws())
    judge_mod.save_judge(judge.net, out / "judge", cfg.judge)
    log.info("exported %s and %s in %.1f min", out / "pipeline", out / "judge",
             (time.time() - t0) / 60)  # fmt: skip
    return out / "pipeline"
