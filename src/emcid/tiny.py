"""Tiny randomly initialised pipelines with the real module names, for tests and fallbacks.

They are built from configs (nothing is downloaded), saved with ``save_pretrained`` and
loaded back through :func:`emcid.load_model` like any real checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .core.cache import cache_root

MAX_TOKENS = 77  # as CLIP


def byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: 256 printable stand-ins for the 256 bytes, in CLIP's
    order (every CLIP-format tokenizer here starts its vocabulary with them)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def word_merges(words: list[str]) -> list[str]:
    """BPE merges that join each word letter by letter into one token (``a b``, ``ab c``...)."""
    merges: dict[str, None] = {}
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges[f"{pieces[0]} {pieces[1]}"] = None
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return list(merges)


def build_tokenizer(folder: Path, words: list[str] | None = None):
    """A CLIP tokenizer whose vocabulary holds the given words whole; other words split into
    letters, so both single-token and multi-token concepts occur, as in real vocabularies."""
    from transformers import CLIPTokenizer

    merges = word_merges(sorted({w.lower() for w in words or [] if w.isascii() and w.isalpha()}))
    symbols = byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += list(dict.fromkeys(m.replace(" ", "") for m in merges))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
        model_max_length=MAX_TOKENS,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_vocabulary() -> list[str]:
    """Words of the object templates, the built-in captions and a few hundred class names."""
    from .concepts import CAPTION_FRAMES, FILLERS, imagenet1k_classes

    text = " ".join(CAPTION_FRAMES + FILLERS + ("an image of a photo",))
    text += " " + " ".join(c.name for c in imagenet1k_classes()[:400])
    return text.replace("{}", " ").split()


def _text_config(tokenizer, hidden: int, layers: int, projection: int = 0, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_act=act,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or hidden,
    )


def _text_encoder(cls, config):
    """A random text encoder whose token identity dominates its position signal, as in trained
    CLIP models (at random init both have the same scale, so every concept at the same position
    would look alike to the edited MLPs)."""
    model = cls(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model


def build_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A random pipeline of the given family, small enough to run hundreds of steps on a CPU."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "tok", tiny_vocabulary())
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    unet_args = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    if family in ("sd1", "sd2"):
        # SD 2.x: an OpenCLIP-style encoder (exact GELU) and v-prediction, as the 768-v models
        act = "gelu" if family == "sd2" else "quick_gelu"
        if family == "sd2":
            scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
        text_encoder = _text_encoder(CLIPTextModel, _text_config(tokenizer, 32, 4, act=act))
        unet = UNet2DConditionModel(cross_attention_dim=32, **unet_args)
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        text_encoder = _text_encoder(CLIPTextModel, _text_config(tokenizer, 32, 4))
        text_encoder_2 = _text_encoder(CLIPTextModelWithProjection,
                                       _text_config(tokenizer, 48, 6, projection=24))
        unet = UNet2DConditionModel(
            cross_attention_dim=32 + 48, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 24,
            **unet_args,
        )
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )
    raise ValueError(f"tiny pipelines exist for 'sd1', 'sd2' and 'sdxl', not {family!r}")


def save_tiny_model(folder: str | os.PathLike, family: str = "sd1", seed: int = 0) -> Path:
    """Build and save a tiny pipeline with small sampling defaults next to it."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder)
    settings = {"num_inference_steps": 4, "guidance_scale": 2.0, "height": 16, "width": 16}
    (folder / "emcid.json").write_text(json.dumps(settings))
    return folder


def ensure_tiny_model(family: str = "sd1") -> Path:
    """The tiny model in the cache folder, built once."""
    folder = cache_root() / "tiny" / family
    if not (folder / "model_index.json").exists():
        save_tiny_model(folder, family)
    return folder


def save_tiny_clip(folder: str | Path, words: list[str]) -> Path:
    """A tiny random CLIP (text and vision towers, 32 wide) with a tokenizer of ``words``,
    saved like a real one: the judge of benchmarks' tests, never downloaded."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    tokenizer = build_tokenizer(folder, words)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(folder)
    return folder

