"""Judges: image classifiers whose class probabilities score ICEB's images.

A judge has ``class_names`` and ``predict_proba(images) -> (n, n_classes)`` softmax
probabilities; its class ``i`` must be ICEB class ``i`` (ImageNet index order, or the
embedded world's concept order). Stable Diffusion models are judged by a ViT ImageNet
classifier (release: ``google/vit-base-patch16-224``); the embedded model by its own judge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..core.bundle import ModelBundle
from ..errors import EmcidError

log = logging.getLogger(__name__)

DEFAULT_VIT = "google/vit-base-patch16-224"  # release judge for SD models


@runtime_checkable
class Judge(Protocol):
    """What ICEB needs from a classifier."""

    class_names: Sequence[str]

    def predict_proba(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class ViTJudge:
    """A transformers ``ViTForImageClassification`` (hub id or local folder) as a judge.

    Preprocessing is done here (resize, scale, normalise with the checkpoint's own mean and
    standard deviation) so the judge needs no optional image-processing backend.
    """

    def __init__(self, path: str = DEFAULT_VIT, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import ViTForImageClassification

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = ViTForImageClassification.from_pretrained(path).to(self.device).eval()
        config = self.model.config
        labels = config.id2label or {}
        self.class_names = [str(labels.get(i, labels.get(str(i), i))) for i in range(config.num_labels)]
        self.size, self.mean, self.std = _preprocessing(path, config.image_size)
        self.source = str(path)

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(img.convert("RGB").resize((self.size, self.size), Image.BILINEAR),
                             dtype=np.float32) / 255.0 for img in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.device)

    @torch.no_grad()
    def predict_proba(self, images: Sequence[Image.Image]) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            logits = self.model(pixel_values=self._pixels(images[start:start + self.batch_size])).logits
            outputs.append(logits.float().softmax(-1).cpu())
        if not outputs:
            return torch.zeros(0, len(self.class_names))
        return torch.cat(outputs)


def _preprocessing(path: str, image_size: int) -> tuple[int, list[float], list[float]]:
    """Size, mean and std from the checkpoint's image-processor config (ViT defaults: 0.5)."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
        size = processor.size
        height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        return int(height or image_size), list(processor.image_mean), list(processor.image_std)
    except Exception as exc:  # no processor config saved next to the weights
        log.info("no image processor config for %s (%s); using ViT defaults", path, exc)
        return image_size, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def default_judge_name(bundle: ModelBundle) -> str:
    """The judge a model is scored by when none is given."""
    return "mini" if bundle.is_embedded else DEFAULT_VIT


def load_judge(bundle: ModelBundle, judge: Judge | str | None = None,
               device: str | torch.device = "cpu") -> Judge:
    """The judge for ``bundle``: the given object, a ViT checkpoint path or id, or the default.

    ``"mini"`` (the default for the embedded model) is the embedded world's own classifier.
    """
    if judge is not None and not isinstance(judge, str):
        return judge
    name = judge or default_judge_name(bundle)
    if name == "mini":
        try:
            from ..mini.judge import load_judge as load_mini_judge
        except ImportError as exc:
            raise EmcidError("the embedded model's judge (emcid.mini.judge) is not installed") from exc
        try:
            return load_mini_judge(device)
        except FileNotFoundError as exc:
            raise EmcidError(f"the embedded model's judge weights are missing: {exc}") from exc
    log.info("loading ViT judge %s", name)
    try:
        return ViTJudge(name, device)
    except (OSError, ValueError) as exc:
        raise EmcidError(f"cannot load the judge {name!r} as a ViT image classifier: {exc}") from exc
