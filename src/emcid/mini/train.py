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

import copy
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import OptionError
from . import judge as judge_mod
from . import style_encoder as style_mod
from . import styles, world
from . import text_encoder as te_mod
from . import tokenizer as tok_mod
from .build import (
    SamplingDefaults,
    assemble_pipeline,
    build_unet,
    build_vae,
    save_pipeline,
    scheduler_kwargs,
)

log = logging.getLogger(__name__)

#: Stages that `--reuse-from` may copy from an earlier run (they do not depend on the text side).
REUSABLE_STAGES = ("vae", "judge")


@dataclass
class MiniTrainConfig:
    """Everything `emcid mini train` does, with the defaults that built the shipped model."""

    seed: int = 0
    vocab_size: int = 4096
    text: te_mod.TextEncoderConfig = field(default_factory=te_mod.TextEncoderConfig)
    style: style_mod.StyleTuneConfig = field(default_factory=style_mod.StyleTuneConfig)
    judge: judge_mod.JudgeConfig = field(default_factory=judge_mod.JudgeConfig)
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_latent_channels: int = 8
    vae_steps: int = 2500
    vae_batch: int = 16  # many small steps converge much faster than few large ones
    vae_lr: float = 2e-3
    prompts_per_concept: int = 16  # size of the cached conditioning bank per concept
    neutral_rate: float = 0.01  # share of UNet samples showing the neutral (empty) canvas
    unet_channels: tuple[int, ...] = (32, 96, 96)
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 6e-4
    unet_init: str | None = None  # a diffusers UNet folder of the same shape to start from
    uncond_prob: float = 0.1  # classifier-free guidance dropout
    after_subject_clean_rate: float = 0.3  # states after the subject -> the empty prompt's
    after_subject_conflict_rate: float = 0.3  # states after the subject -> another prompt's
    conflict_from: str = "end_of_text"  # or "subject": every state after the subject (recipe B)
    padding_clean_rate: float = 0.2  # states after the end of text -> the empty prompt's
    task_rate: float = 0.0  # share of each UNet batch from the task bank (styles, colour words)
    task_examples: int = 32768  # rows of the task bank
    task_mix: tuple[float, float, float] = (0.35, 0.4, 0.25)  # style alone / object in a style / colour word
    ema_decay: float = 0.999
    n_variants: int = 16  # renders per concept in the latent bank
    eval_every: int = 1000
    eval_concepts: int = 200
    checkpoint_minutes: float = 5.0
    max_minutes: float | None = None  # wall-clock cap of the UNet stage (None: run all steps)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        rates = (self.after_subject_clean_rate, self.after_subject_conflict_rate,
                 self.padding_clean_rate)  # fmt: skip
        if min(rates) < 0 or sum(rates) > 1:
            raise ValueError(f"UNet augmentation rates must be >= 0 and sum to at most 1, got {rates}")
        if not 0 <= self.task_rate < 1:
            raise ValueError(f"task_rate must be in [0, 1), got {self.task_rate}")
        if len(self.task_mix) != 3 or min(self.task_mix) < 0 or sum(self.task_mix) <= 0:
            raise ValueError(f"task_mix must be three non-negative shares, got {self.task_mix}")

    def draws(self) -> list[str]:
        """What the UNet learns to draw beyond the world's objects (recorded in emcid.json)."""
        if not self.task_rate:
            return []
        alone, styled, colour = self.task_mix
        return (["styles"] if alone + styled else []) + (["colour_words"] if colour else [])


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


def copy_stages(work: Path, source: Path, stages: tuple[str, ...] = REUSABLE_STAGES) -> None:
    """Copy finished stages from an earlier run's ``work`` folder.

    The VAE and judge do not depend on the text side, so a rebuild of the text side need not
    pay for them again; the tokenizer, text encoder and conditioning bank can be reused by a
    run that changes only the UNet's training. Stages already present in ``work`` are left
    alone.
    """
    for stage in stages:
        src, dst = source / stage, work / stage
        if _done(dst):
            continue
        if not _done(src):
            raise FileNotFoundError(f"{src} is not a finished '{stage}' stage (no DONE marker)")
        shutil.copytree(src, dst, dirs_exist_ok=True)
        log.info("reused stage %s from %s", stage, src)


def stage_tokenizer(work: Path, cfg: MiniTrainConfig) -> CLIPTokenizer:
    path = work / "tokenizer"
    if not _done(path):
        tok_mod.train_tokenizer(path, cfg.vocab_size)
        _mark(path, {})
    return tok_mod.load_tokenizer(path)


def stage_text_encoder(work: Path, cfg: MiniTrainConfig, tok: CLIPTokenizer) -> CLIPTextModel:
    """Pretrain (resumably), then store in float16: the frozen weights are what SD ships."""
    path = work / "text_encoder"
    if not _done(path):
        path.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        torch.manual_seed(cfg.text.seed)
        if cfg.text.init_from is not None:  # fine-tune an earlier encoder (e.g. to add the marker)
            model = te_mod.load_init_encoder(cfg.text.init_from, tok, cfg.text)
        else:
            model = te_mod.build_text_encoder(tok, cfg.text)
        metrics = te_mod.pretrain_text_encoder(
            model, tok, cfg.text, state_file=path / "state.pt",
            checkpoint_minutes=cfg.checkpoint_minutes,
        )  # fmt: skip
        _store_encoder(path, model, {"probe": metrics, "seconds": time.time() - t0})
    return _load_frozen_encoder(path)


def _store_encoder(path: Path, model: CLIPTextModel, info: dict) -> None:
    """Save a trained encoder in float16, drop its training state and mark the stage done."""
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    (path / "state.pt").unlink(missing_ok=True)
    _mark(path, info)


def _load_frozen_encoder(path: Path) -> CLIPTextModel:
    """A stored encoder in float32, frozen, as every later stage uses it."""
    model = CLIPTextModel.from_pretrained(path, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def stage_style_encoder(work: Path, cfg: MiniTrainConfig, tok: CLIPTokenizer,
                        text_encoder: CLIPTextModel) -> CLIPTextModel:
    """The encoder fine-tuned so that styles compose with objects (resumable; float16 on disk).
    It replaces the pretrained one for every later stage and in the exported pipeline."""
    path = work / "style_encoder"
    if not _done(path):
        path.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        model = copy.deepcopy(text_encoder)
        metrics = style_mod.tune_for_styles(model, tok, cfg.style, state_file=path / "state.pt",
                                            checkpoint_minutes=cfg.checkpoint_minutes)
        _store_encoder(path, model, {"probe": metrics, "seconds": time.time() - t0})
    return _load_frozen_encoder(path)


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
def vae_latents(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 256,
                progress: bool = False) -> torch.Tensor:
    """Scaled latent means of uint8 images [n, 3, h, w]."""
    out = []
    for i in tqdm(range(0, len(pixels), batch), desc="latents", mininterval=5, disable=not progress):
        x = pixels[i : i + batch].float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out)


def encode_bank(vae: AutoencoderKL, bank: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latent means of all renders, then the neutral canvas's (row index 2,000)."""
    neutral = torch.from_numpy(np.array(world.render_neutral())).permute(2, 0, 1)[None]
    return torch.cat([vae_latents(vae, bank, batch, progress=True), vae_latents(vae, neutral)])


# --- the conditioning bank ---------------------------------------------------------


@dataclass
class ConditioningBank:
    """Frozen-encoder states of the UNet's training prompts; row = concept * K + k.

    Concept index ``len(concepts)`` is the neutral canvas. ``clean`` holds the states of the
    empty prompt, which replace padding (and later tokens) in augmentation and in guidance
    dropout.
    """

    states: torch.Tensor  # [rows, L, hidden] float16
    subject_pos: torch.Tensor  # [rows]
    eos_pos: torch.Tensor  # [rows]
    clean: torch.Tensor  # [L, hidden] float32
    per_concept: int


def bank_prompts(cfg: MiniTrainConfig) -> list[tuple[str, str]]:
    """(name, template) per bank row: K seeded training prompts per concept, then neutral."""
    concepts = world.load_concepts()
    out = []
    for c in concepts:
        rng = random.Random(cfg.seed * 1_000_003 + 7_919 * c.index)
        items = te_mod.sample_items(
            [c], rng, cfg.prompts_per_concept, weak_alias_rate=cfg.text.weak_alias_rate,
            context_rate=cfg.text.context_rate,
        )  # fmt: skip
        out.extend((name, template) for _, name, template in items)
    rng = random.Random(cfg.seed * 1_000_003 + 7_919 * len(concepts))
    for _ in range(cfg.prompts_per_concept):
        out.append((world.NEUTRAL_NAME, rng.choice(world.TRAIN_TEMPLATES)))
    return out


def stage_conditioning(
    work: Path, cfg: MiniTrainConfig, tok: CLIPTokenizer, text_encoder: CLIPTextModel,
    chunk: int = 2048,
) -> ConditioningBank:
    """Encode the bank once, chunk by chunk (an interrupted run keeps finished chunks)."""
    path = work / "conditioning"
    path.mkdir(parents=True, exist_ok=True)
    prompts = bank_prompts(cfg)
    n_chunks = (len(prompts) + chunk - 1) // chunk
    for i in tqdm(range(n_chunks), desc="conditioning", mininterval=5):
        file = path / f"chunk{i:04d}.safetensors"
        if file.exists():
            continue
        part = prompts[i * chunk : (i + 1) * chunk]
        ids, subject, eos = te_mod.token_positions(tok, part, pad_to_max=True)
        with torch.no_grad():
            states = torch.cat([text_encoder(ids[j : j + 256])[0] for j in range(0, len(ids), 256)])
        tmp = file.with_suffix(".tmp")
        save_file({"states": states.half(), "subject": subject, "eos": eos}, str(tmp))
        tmp.replace(file)
    if not _done(path):
        _mark(path, {"prompts": len(prompts), "chunks": n_chunks})
    parts = [load_file(str(path / f"chunk{i:04d}.safetensors")) for i in range(n_chunks)]
    with torch.no_grad():
        clean = text_encoder(te_mod.encode_prompts(tok, [""]))[0][0]
    return ConditioningBank(
        torch.cat([p["states"] for p in parts]),
        torch.cat([p["subject"] for p in parts]),
        torch.cat([p["eos"] for p in parts]),
        clean.float(),
        cfg.prompts_per_concept,
    )


@dataclass
class TaskBank:
    """Frozen-encoder states and VAE latents of the task vocabulary's examples, one per row."""

    states: torch.Tensor  # [rows, L, hidden] float16
    eos_pos: torch.Tensor  # [rows]
    latents: torch.Tensor  # [rows, C, h, w]


def stage_task_bank(work: Path, cfg: MiniTrainConfig, tok: CLIPTokenizer, text_encoder: CLIPTextModel,
                    vae: AutoencoderKL, chunk: int = 2048) -> TaskBank:
    """Encode ``cfg.task_examples`` seeded style / colour-word examples once, in resumable chunks."""
    path = work / "tasks"
    path.mkdir(parents=True, exist_ok=True)
    n_chunks = (cfg.task_examples + chunk - 1) // chunk
    for i in tqdm(range(n_chunks), desc="task bank", mininterval=5):
        file = path / f"chunk{i:04d}.safetensors"
        if file.exists():
            continue
        count = min(chunk, cfg.task_examples - i * chunk)
        examples = styles.sample_task_examples(count, seed=cfg.seed * 1_000_003 + i, mix=cfg.task_mix)
        ids = te_mod.encode_prompts(tok, [e.prompt for e in examples], pad_to_max=True)
        pixels = torch.from_numpy(np.stack([np.asarray(e.image) for e in examples])).permute(0, 3, 1, 2)
        with torch.no_grad():
            states = torch.cat([text_encoder(ids[j : j + 256])[0] for j in range(0, len(ids), 256)])
        latents = vae_latents(vae, pixels)
        eos = (ids == tok.eos_token_id).int().argmax(dim=1)
        tmp = file.with_suffix(".tmp")
        save_file({"states": states.half(), "eos": eos, "latents": latents.contiguous()}, str(tmp))
        tmp.replace(file)
    if not _done(path):
        _mark(path, {"examples": cfg.task_examples, "chunks": n_chunks})
    parts = [load_file(str(path / f"chunk{i:04d}.safetensors")) for i in range(n_chunks)]
    return TaskBank(*(torch.cat([p[k] for p in parts]) for k in ("states", "eos", "latents")))


def task_conditioning(tasks: TaskBank, rows: torch.Tensor, clean: torch.Tensor, cfg: MiniTrainConfig,
                      gen: torch.Generator) -> torch.Tensor:
    """Task rows' states: every word counts (no state after a subject is replaced), padding
    is the empty prompt's with ``padding_clean_rate``, and guidance dropout as for the bank."""
    cond = tasks.states[rows].float()
    after_text = torch.arange(cond.shape[1])[None] > tasks.eos_pos[rows][:, None]
    blank = (torch.rand(len(rows), generator=gen) < cfg.padding_clean_rate)[:, None] & after_text
    blank |= (torch.rand(len(rows), generator=gen) < cfg.uncond_prob)[:, None]
    return torch.where(blank[..., None], clean.expand_as(cond), cond)


def augment_conditioning(
    bank: ConditioningBank, rows: torch.Tensor, cfg: MiniTrainConfig, gen: torch.Generator
) -> torch.Tensor:
    """Batch conditioning with the token augmentations and guidance dropout.

    Per sample, one of: every state after the subject's last token takes the empty prompt's
    state at that position (``after_subject_clean_rate``), or another prompt's of the batch
    (``after_subject_conflict_rate``: the image still shows the subject, so the UNet learns
    to trust the subject token over what follows it, as SD's UNet does; with
    ``conflict_from="end_of_text"`` only the end-of-text and padding states are the other
    prompt's, aligned at its end of text); else every state after the end of text takes the
    empty prompt's (``padding_clean_rate``). With ``uncond_prob`` the whole prompt is the
    empty one.
    """
    cond = bank.states[rows].float()
    length = cond.shape[1]
    positions = torch.arange(length)[None]
    u = torch.rand(len(rows), generator=gen)[:, None]
    after_subject = positions > bank.subject_pos[rows][:, None]
    after_text = positions > bank.eos_pos[rows][:, None]
    bounds = torch.tensor([cfg.after_subject_clean_rate, cfg.after_subject_conflict_rate,
                           cfg.padding_clean_rate]).cumsum(0)  # fmt: skip
    clean = ((u < bounds[0]) & after_subject) | ((u >= bounds[1]) & (u < bounds[2]) & after_text)
    others = rows[torch.randperm(len(rows), generator=gen)]
    conflict = (u >= bounds[0]) & (u < bounds[1])
    if cfg.conflict_from == "end_of_text":
        conflict = conflict & (positions >= bank.eos_pos[rows][:, None])
        shift = (bank.eos_pos[others] - bank.eos_pos[rows])[:, None]
        source = (positions + shift).clamp(0, length - 1)
        foreign = bank.states[others].float().gather(1, source[..., None].expand_as(cond))
    else:
        conflict = conflict & after_subject
        foreign = bank.states[others].float()
    cond = torch.where(conflict[..., None], foreign, cond)
    clean |= (torch.rand(len(rows), generator=gen) < cfg.uncond_prob)[:, None]
    return torch.where(clean[..., None], bank.clean.expand_as(cond), cond)


def _sample_rows(
    rng: random.Random, cfg: MiniTrainConfig, n_concepts: int, count: int
) -> tuple[torch.Tensor, list[int]]:
    """``count`` bank rows and their concept indices (the neutral one rarely)."""
    picks = [
        n_concepts if rng.random() < cfg.neutral_rate else rng.randrange(n_concepts)
        for _ in range(count)
    ]
    rows = [c * cfg.prompts_per_concept + rng.randrange(cfg.prompts_per_concept) for c in picks]
    return torch.tensor(rows), picks


# --- the UNet ------------------------------------------------------------------------


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
