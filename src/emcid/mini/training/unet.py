"""The UNet stage: v-prediction on the cached banks, EMA weights, resumable, evaluated by the
world's judge on seeded samples."""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ...errors import OptionError
from .. import judge as judge_mod
from .. import text_encoder as te_mod
from .. import world
from ..build import SamplingDefaults, assemble_pipeline, build_unet, save_pipeline, scheduler_kwargs
from .banks import ConditioningBank, TaskBank, _sample_rows, augment_conditioning, task_conditioning
from .config import MiniTrainConfig
from .stages import _done, _mark

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    sampling: SamplingDefaults,
    batch_size: int = 64,
) -> list[Image.Image]:
    """Seeded sampling through the stock pipeline (one generator per image)."""
    pipe.set_progress_bar_config(disable=True)
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        res = pipe(
            prompt=prompts[i : i + batch_size],
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            height=sampling.height,
            width=sampling.width,
            generator=gens,
        )
        out.extend(res.images)
    return out


def evaluate_pipeline(
    pipe: StableDiffusionPipeline,
    judge: judge_mod.Judge,
    sampling: SamplingDefaults,
    n_concepts: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Judge top-1 on a seeded subset: edit template 0 and one free-form prompt each."""
    concepts = world.load_concepts()
    pick = random.Random(seed).sample(concepts, n_concepts)
    res = {}
    for key, items in {
        "edit": [(world.EDIT_TEMPLATES[0].format(c.name), 1000 + c.index, c.index) for c in pick],
        "free": [(*world.free_form_prompts(c)[0], c.index) for c in pick],
    }.items():
        images = sample_images(pipe, [p for p, _, _ in items], [s for _, s, _ in items], sampling)
        pred = judge.predict_proba(images).argmax(-1)
        res[key] = float((pred == torch.tensor([i for _, _, i in items])).float().mean())
    return res


def warm_start(unet: UNet2DConditionModel, folder: Path) -> None:
    """Start from an earlier UNet of the same shape (e.g. one trained on another text side).

    Drawing the world transfers between text encoders that share the VAE; only reading the
    conditioning has to be learned again, which costs far fewer steps than drawing.
    """
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--unet-init {folder}: not a diffusers UNet folder (no config.json)")
    weights = UNet2DConditionModel.from_pretrained(folder).state_dict()
    try:
        unet.load_state_dict(weights)  # strict: every key present, every shape equal
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:]), str(exc))
        raise OptionError(f"--unet-init {folder}: UNet shape differs from the configured one "
                          f"({detail})") from None
    log.info("UNet warm-started from %s", folder)


def stage_unet(
    work: Path,
    out: Path,
    cfg: MiniTrainConfig,
    tok: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    latents: torch.Tensor,
    bank: ConditioningBank,
    judge: judge_mod.Judge,
    tasks: TaskBank | None = None,
) -> tuple[UNet2DConditionModel, bool]:
    """v-prediction training on the cached conditioning, resumable from work/unet/state.pt;
    with ``tasks``, ``cfg.task_rate`` of each batch comes from the task bank.

    Returns the EMA UNet and whether the schedule is finished (``max_minutes`` may stop it
    early; a later ``--resume`` continues it).
    """
    path = work / "unet"
    path.mkdir(parents=True, exist_ok=True)
    if _done(path):
        return UNet2DConditionModel.from_pretrained(path / "ema"), True
    torch.manual_seed(cfg.seed + 5)
    lat = vae.config.latent_channels
    unet = build_unet(cfg.unet_channels, text_encoder.config.hidden_size, lat)
    if cfg.unet_init is not None:
        warm_start(unet, Path(cfg.unet_init))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    sched = te_mod.warmup_cosine(opt, cfg.unet_steps, warmup=200)
    state_file = path / "state.pt"
    parts = {"unet": unet, "ema": ema, "opt": opt, "sched": sched}
    start = te_mod.load_training_state(state_file, parts)
    history_file = path / "history.json"
    history: list[dict] = json.loads(history_file.read_text()) if history_file.exists() else []
    noise_sched = DDPMScheduler(**scheduler_kwargs())
    n_concepts = len(world.load_concepts())
    n_var = cfg.n_variants

    def ema_unet() -> UNet2DConditionModel:
        averaged = copy.deepcopy(unet)
        ema.copy_to(averaged.parameters())
        return averaged.eval()

    def checkpoint(done_steps: int) -> None:
        te_mod.save_training_state(state_file, parts, done_steps)
        history_file.write_text(json.dumps(history, indent=1))
        pipe = assemble_pipeline(vae, text_encoder, tok, ema_unet())
        save_pipeline(pipe, out / "pipeline", cfg.sampling, work / "tokenizer", half_text_encoder=True,
                      tasks=cfg.draws())

    t_start = last_ckpt = time.time()
    unet.train()
    done_steps = start
    finished = True
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps,
               mininterval=10)  # fmt: skip
    for step in bar:
        rng = te_mod.step_rng(cfg.seed, step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        n_task = round(cfg.unet_batch * cfg.task_rate) if tasks is not None else 0
        rows, picks = _sample_rows(rng, cfg, n_concepts, cfg.unet_batch - n_task)
        cond = augment_conditioning(bank, rows, cfg, gen)
        x0 = latents[torch.tensor([c * n_var + rng.randrange(n_var) if c < n_concepts
                                   else len(latents) - 1 for c in picks])]  # fmt: skip
        if n_task:
            task_rows = torch.tensor([rng.randrange(len(tasks.latents)) for _ in range(n_task)])
            cond = torch.cat([cond, task_conditioning(tasks, task_rows, bank.clean, cfg, gen)])
            x0 = torch.cat([x0, tasks.latents[task_rows]])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        done_steps = step + 1
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        if cfg.eval_every and done_steps % cfg.eval_every == 0:
            pipe = assemble_pipeline(vae, text_encoder, tok, ema_unet())
            metrics = evaluate_pipeline(pipe, judge, cfg.sampling, cfg.eval_concepts, cfg.seed)
            history.append({"step": done_steps, "minutes": (time.time() - t_start) / 60, **metrics})
            log.info("unet step %d: %s", done_steps, metrics)
        if cfg.max_minutes is not None and (time.time() - t_start) / 60 >= cfg.max_minutes:
            finished = done_steps >= cfg.unet_steps
            log.info("UNet stage stopped by max_minutes at step %d", done_steps)
            break
        if time.time() - last_ckpt >= cfg.checkpoint_minutes * 60:
            checkpoint(done_steps)
            last_ckpt = time.time()
    checkpoint(done_steps)
    averaged = ema_unet()
    if finished:
        averaged.save_pretrained(path / "ema", safe_serialization=True)
        _mark(path, {"steps": done_steps, "history": history})
    return averaged, finished
