"""`emcid mini train`: one seeded, resumable command that builds the embedded model.

Stages (each writes its result under `out/work/` and is skipped on --resume when done):

1. tokenizer: CLIP-format BPE on the world's text.
2. text encoder: CLIPTextModel pretrained to name -> signature, then frozen (as in SD).
3. VAE: a small AutoencoderKL, 32x32x3 <-> 8x8x8 latents (factor 4, SD has 8; so the
   UNet works on 64 positions: cheap enough for the sampling-throughput bar).
4. judge: the world's classifier (also evaluates the UNet during training).
5. UNet: UNet2DConditionModel, v-prediction (issue 3: the decisive choice), classifier-
   free guidance dropout, EMA weights; checkpoints every few minutes.
6. export: a StableDiffusionPipeline folder (safetensors) + emcid.json, and the judge.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from . import judge as judge_mod
from . import text_encoder as te_mod
from . import tokenizer as tok_mod
from . import world

log = logging.getLogger(__name__)


@dataclass
class SamplingDefaults:
    """Recommended generation settings, written to emcid.json."""

    num_inference_steps: int = 8  # 8 DDIM steps judged as well as 10-15 (docs/mini.md)
    guidance_scale: float = 3.0  # 3.0 >= 2.0 > 1.5 in the sweep
    height: int = 32
    width: int = 32


@dataclass
class MiniTrainConfig:
    """Everything `emcid mini train` does, with the defaults that built the shipped model."""

    seed: int = 0
    vocab_size: int = 4096
    text: te_mod.TextEncoderConfig = field(default_factory=te_mod.TextEncoderConfig)
    judge: judge_mod.JudgeConfig = field(default_factory=judge_mod.JudgeConfig)
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_latent_channels: int = 8
    vae_steps: int = 2500
    vae_batch: int = 16  # many small steps converge much faster than few large ones
    vae_lr: float = 2e-3
    unet_channels: tuple[int, ...] = (32, 96, 96)
    unet_steps: int = 9500
    unet_batch: int = 64
    unet_lr: float = 6e-4
    uncond_prob: float = 0.1  # classifier-free guidance dropout
    ema_decay: float = 0.999
    n_variants: int = 16  # renders per concept in the latent bank
    eval_every: int = 1000
    eval_concepts: int = 200
    checkpoint_minutes: float = 5.0
    max_minutes: float | None = None  # wall-clock cap of the UNet stage (None: run all steps)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)


# --- model builders ----------------------------------------------------------------


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


def _scheduler_kwargs() -> dict:
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
    return DDIMScheduler(**_scheduler_kwargs(), set_alpha_to_one=False)


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
) -> None:
    """save_pretrained (safetensors) plus emcid.json with the sampling defaults.

    The fast tokenizer saves only tokenizer.json; CLIP's vocab.json + merges.txt from
    `tokenizer_dir` replace it, so the shipped files are the CLIP-format ones.
    """
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_dir / name, tmp / "tokenizer" / name)
        (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    (tmp / "emcid.json").write_text(json.dumps({**asdict(sampling), "world": "mini"}, indent=1))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            _rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        _rmtree(old)
    else:
        tmp.rename(folder)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# --- sampling for evaluation -------------------------------------------------------


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


# --- stages ------------------------------------------------------------------------


def _done(path: Path) -> bool:
    return (path / "DONE").exists()


def _mark(path: Path, info: dict) -> None:
    (path / "DONE").write_text(json.dumps(info, indent=1))


def stage_tokenizer(work: Path, cfg: MiniTrainConfig) -> CLIPTokenizer:
    path = work / "tokenizer"
    if not _done(path):
        tok_mod.train_tokenizer(path, cfg.vocab_size)
        _mark(path, {})
    return tok_mod.load_tokenizer(path)


def stage_text_encoder(work: Path, cfg: MiniTrainConfig, tok: CLIPTokenizer) -> CLIPTextModel:
    path = work / "text_encoder"
    if not _done(path):
        t0 = time.time()
        model = te_mod.build_text_encoder(tok, cfg.text)
        metrics = te_mod.pretrain_text_encoder(model, tok, cfg.text)
        model.save_pretrained(path, safe_serialization=True)
        _mark(path, {"probe": metrics, "seconds": time.time() - t0})
    model = CLIPTextModel.from_pretrained(path)
    return model.eval().requires_grad_(False)


def stage_vae(work: Path, cfg: MiniTrainConfig, bank: torch.Tensor) -> AutoencoderKL:
    path = work / "vae"
    if not _done(path):
        t0 = time.time()
        torch.manual_seed(cfg.seed + 3)
        vae = build_vae(cfg.vae_channels, cfg.vae_latent_channels)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
        sched = te_mod.warmup_cosine(opt, cfg.vae_steps, warmup=20)
        gen = torch.Generator().manual_seed(cfg.seed + 3)
        vae.train()
        bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
        for _step in bar:
            idx = torch.randint(len(bank), (cfg.vae_batch,), generator=gen)
            x = bank[idx].float() / 127.5 - 1
            post = vae.encode(x).latent_dist
            z = post.sample(generator=gen)
            rec = vae.decode(z).sample
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        vae.eval()
        with torch.no_grad():
            x = bank[torch.randint(len(bank), (512,), generator=gen)].float() / 127.5 - 1
            z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
            std = float(z.std())
            mse = float(F.mse_loss(rec, x))
        vae.register_to_config(scaling_factor=1.0 / std)
        vae.save_pretrained(path, safe_serialization=True)
        _mark(path, {"recon_mse": mse, "latent_std": std, "seconds": time.time() - t0})
        log.info("vae: recon mse %.5f, latent std %.3f", mse, std)
    return AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)


def stage_judge(work: Path, cfg: MiniTrainConfig) -> judge_mod.Judge:
    path = work / "judge"
    if not _done(path):
        t0 = time.time()
        net, metrics = judge_mod.train_judge(cfg.judge)
        judge_mod.save_judge(net, path, cfg.judge)
        _mark(path, {**metrics, "seconds": time.time() - t0})
    return judge_mod.load_judge(folder=path)


@torch.no_grad()
def encode_bank(vae: AutoencoderKL, bank: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latent means of all renders."""
    out = []
    for i in tqdm(range(0, len(bank), batch), desc="latents", mininterval=5):
        x = bank[i : i + batch].float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)


def stage_unet(
    work: Path,
    out: Path,
    cfg: MiniTrainConfig,
    tok: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    latents: torch.Tensor,
    judge: judge_mod.Judge,
) -> UNet2DConditionModel:
    """v-prediction training on the frozen encoder, resumable from work/unet_state.pt."""
    path = work / "unet"
    path.mkdir(parents=True, exist_ok=True)
    if _done(path):
        return UNet2DConditionModel.from_pretrained(path / "ema")
    torch.manual_seed(cfg.seed + 5)
    lat = vae.config.latent_channels
    unet = build_unet(cfg.unet_channels, text_encoder.config.hidden_size, lat)
    ema = build_unet(cfg.unet_channels, text_encoder.config.hidden_size, lat)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    sched = te_mod.warmup_cosine(opt, cfg.unet_steps, warmup=200)
    state_file = path / "state.pt"
    start = 0
    history: list[dict] = []
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = int(state["step"])
        history = json.loads(state["history"]) if "history" in state else []
        log.info("resuming UNet at step %d", start)
    noise_sched = DDPMScheduler(**_scheduler_kwargs())
    concepts = world.load_concepts()
    n_var = cfg.n_variants
    uncond_ids = te_mod.encode_prompts(tok, [""])

    def save_state(step: int) -> None:
        tmp = state_file.with_suffix(".tmp")
        torch.save(
            {
                "unet": unet.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "step": step,
                "history": json.dumps(history),
            },
            tmp,
        )
        tmp.replace(state_file)
        save_pipeline(
            assemble_pipeline(vae, text_encoder, tok, ema), out / "pipeline", cfg.sampling,
            work / "tokenizer",
        )

    t_start = time.time()
    last_ckpt = time.time()
    unet.train()
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps,
               mininterval=10)  # fmt: skip
    step = start
    for step in bar:
        rng = random.Random(cfg.seed * 1_000_003 + step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        items = te_mod.sample_items(
            concepts, rng, cfg.unet_batch, weak_alias_rate=cfg.text.weak_alias_rate,
            context_rate=cfg.text.context_rate,
        )
        ids = te_mod.encode_prompts(tok, [t.format(n) for _, n, t in items])
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.uncond_prob
        ids[drop] = uncond_ids
        with torch.no_grad():
            cond = text_encoder(ids)[0]
        rows = torch.tensor([c.index * n_var + rng.randrange(n_var) for c, _, _ in items])
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        pred = unet(xt, t, cond).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        done_steps = step + 1
        if cfg.eval_every and done_steps % cfg.eval_every == 0:
            pipe = assemble_pipeline(vae, text_encoder, tok, ema)
            metrics = evaluate_pipeline(pipe, judge, cfg.sampling, cfg.eval_concepts, cfg.seed)
            history.append({"step": done_steps, "minutes": (time.time() - t_start) / 60, **metrics})
            log.info("unet step %d: %s", done_steps, metrics)
        over = cfg.max_minutes is not None and (time.time() - t_start) / 60 >= cfg.max_minutes
        if time.time() - last_ckpt >= cfg.checkpoint_minutes * 60 or over:
            save_state(done_steps)
            last_ckpt = time.time()
        if over:
            log.info("UNet stage stopped by max_minutes at step %d", done_steps)
            break
    save_state(step + 1)
    ema.save_pretrained(path / "ema", safe_serialization=True)
    _mark(path, {"steps": step + 1, "history": history})
    return ema


def train_mini(out_dir: str | Path, cfg: MiniTrainConfig | None = None, resume: bool = False):
    """Run every stage; returns the exported pipeline folder.

    Without --resume an existing work folder is an error, so runs are never mixed.
    """
    cfg = cfg or MiniTrainConfig()
    out = Path(out_dir)
    work = out / "work"
    if work.exists() and not resume:
        raise FileExistsError(f"{work} exists; pass resume=True (--resume) to continue it")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tok = stage_tokenizer(work, cfg)
    text_encoder = stage_text_encoder(work, cfg, tok)
    log.info("stage text encoder done at %.1f min", (time.time() - t0) / 60)
    bank = judge_mod.render_bank(cfg.n_variants, seed=cfg.seed)
    vae = stage_vae(work, cfg, bank)
    log.info("stage vae done at %.1f min", (time.time() - t0) / 60)
    judge = stage_judge(work, cfg)
    log.info("stage judge done at %.1f min", (time.time() - t0) / 60)
    latents = encode_bank(vae, bank)
    del bank
    unet = stage_unet(work, out, cfg, tok, text_encoder, vae, latents, judge)
    log.info("stage unet done at %.1f min", (time.time() - t0) / 60)
    pipe = assemble_pipeline(vae, text_encoder, tok, unet)
    save_pipeline(pipe, out / "pipeline", cfg.sampling, work / "tokenizer")
    judge_mod.save_judge(judge.net, out / "judge", cfg.judge)
    log.info("exported %s and %s in %.1f min", out / "pipeline", out / "judge",
             (time.time() - t0) / 60)  # fmt: skip
    return out / "pipeline"


