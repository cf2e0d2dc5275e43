"""Judges that choose, for each image, between two texts: what TIMED and RoAD score with.

A pair judge returns P(destination) per image, the softmax over its (source, destination)
pair of texts, as the papers' CLIP classifier does. On Stable Diffusion that is a CLIP model,
read only from this machine (a benchmark never downloads a judge); on the embedded world it
is the world's own judge, reading the background colour each text names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import BenchmarkError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# OpenAI CLIP's image normalisation (every openai/clip-* and most open CLIP checkpoints use it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The world judge's reading of an image whose likeliest background is neither text's colour:
#: it shows neither side (rather than a ratio of two vanishing probabilities).
NEITHER = 0.5


class PairJudge(Protocol):
    """What the single-edit benchmarks need from a judge."""

    def destination_proba(self, images: Sequence[Image.Image],
                          pairs: Sequence[tuple[str, str]]) -> torch.Tensor: ...

    def describe(self) -> dict: ...


class ClipPairJudge:
    """A transformers ``CLIPModel`` (hub id in the local cache, or a folder) as a pair judge.

    Images are resized (shorter side, bicubic), centre-cropped to the model's input size and
    normalised here, so no image-processing backend is needed.
    """

    def __init__(self, model_id: str = DEFAULT_CLIP, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(model_id, local_files_only=True)
            self.model = model.to(device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BenchmarkError(
                f"the CLIP judge {model_id!r} is not on this machine (benchmarks never download a "
                "judge): put it in the Hugging Face cache first, or give --judge a local folder") from exc
        self.model_id, self.device, self.batch_size = str(model_id), torch.device(device), batch_size
        self.size = int(self.model.config.vision_config.image_size)

    def describe(self) -> dict:
        return {"kind": "clip", "id": self.model_id, "image_size": self.size,
                "logit_scale": float(self.model.logit_scale.exp()), "mean": CLIP_MEAN, "std": CLIP_STD}

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = []
        for image in images:
            image = image.convert("RGB")
            scale = self.size / min(image.size)
            width, height = (max(self.size, round(side * scale)) for side in image.size)
            image = image.resize((width, height), Image.BICUBIC)
            left, top = (width - self.size) // 2, (height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return pixels.to(self.device)

    @torch.no_grad()
    def destination_proba(self, images: Sequence[Image.Image],
                          pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """P(destination text) of each image against its own (source, destination) pair."""
        check_pairs(images, pairs)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            texts = list(dict.fromkeys(t for pair in chunk for t in pair))
            tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            logits = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                pixel_values=self._pixels(images[start:start + self.batch_size])
                                ).logits_per_image.float().cpu()
            rows = torch.arange(len(chunk))
            source = logits[rows, [texts.index(s) for s, _ in chunk]]
            destination = logits[rows, [texts.index(d) for _, d in chunk]]
            out.append(torch.stack([source, destination], 1).softmax(1)[:, 1])
        return torch.cat(out) if out else torch.zeros(0)


class WorldPairJudge:
    """The embedded world's judge as a pair judge: a text names a background colour (its
    colour word, "teal tench" -> teal, or else its concept's own, "tench" -> the tench's), and
    P(destination) is the judge's belief in the destination's colour against the source's, or
    ``NEITHER`` where its likeliest background is another colour."""

    def __init__(self, device: str | torch.device = "cpu"):
        from ..mini.judge import load_judge

        self.judge = load_judge(str(device))

    def describe(self) -> dict:
        from ..mini.judge import JUDGE_SIZE

        return {"kind": "mini", "id": "mini", "image_size": JUDGE_SIZE, "reads": "background colour",
                "neither": NEITHER}

    @staticmethod
    def colour(text: str) -> int:
        """The palette colour a text names: its colour word's, or its concept's background."""
        from ..mini import styles

        words = [w for w in text.lower().split() if w in styles.COLOUR_WORDS]
        try:
            return styles.colour_of_phrase(text) if words else styles.style_colour(text)
        except KeyError as exc:
            raise BenchmarkError(f"the embedded world's judge cannot read {text!r}: give a concept "
                                 "name, or a colour word and a concept name") from exc

    @torch.no_grad()
    def destination_proba(self, images: Sequence[Image.Image],
                          pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        check_pairs(images, pairs)
        if not images:
            return torch.zeros(0)
        proba = self.judge.background_proba(list(images)).double()
        rows = torch.arange(len(images))
        source = torch.tensor([self.colour(s) for s, _ in pairs])
        destination = torch.tensor([self.colour(d) for _, d in pairs])
        top = proba.argmax(1)
        ratio = proba[rows, destination] / (proba[rows, source] + proba[rows, destination])
        return torch.where((top == source) | (top == destination), ratio, NEITHER).float()


def check_pairs(images: Sequence[Image.Image], pairs: Sequence[tuple[str, str]]) -> None:
    if len(images) != len(pairs):
        raise ValueError(f"{len(images)} images but {len(pairs)} text pairs")
