"""The stages before the UNet's: tokenizer, text encoder (and its style tuning), VAE, judge.
Each writes its result under ``work/`` and is skipped once done (a ``DONE`` marker)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .. import judge as judge_mod
from .. import style_encoder as style_mod
from .. import text_encoder as te_mod
from .. import tokenizer as tok_mod
from ..build import build_vae
from .config import REUSABLE_STAGES, MiniTrainConfig

log = logging.getLogger(__name__)


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
