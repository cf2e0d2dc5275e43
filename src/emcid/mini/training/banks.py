"""What the UNet trains on, computed once: VAE latents of the world's renders, the frozen
encoder's states of the training prompts (the conditioning bank, with its token augmentations)
and of the task vocabulary's examples (the task bank)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .. import styles, world
from .. import text_encoder as te_mod
from .config import MiniTrainConfig
from .stages import _done, _mark


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
