"""General-quality metrics: FID and CLIP score through torchmetrics, LPIPS through lpips, and
their analogues on the embedded world (features of the world's judge).

The metrics are the field's implementations, fed with features this module computes, so that
no metric downloads a network at run time: FID runs torchmetrics' ``FrechetInceptionDistance``
over a given feature extractor (CLIP's image embeddings on Stable Diffusion, the world judge's
pooled last block on the embedded world), CLIP score torchmetrics' ``clip_score`` over a local
CLIP. Real LPIPS needs lpips, a torchvision built for the installed torch and torchvision's
AlexNet weights, which it downloads at first use (a benchmark never does); the world's analogue
compares the judge's unit-normalised activations as LPIPS compares AlexNet's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import BenchmarkError

#: torchvision's file of the AlexNet weights lpips builds on (in torch's hub cache).
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def _torchmetrics():
    """torchmetrics, or a one-line error saying how to get it (it is the ``bench`` extra)."""
    try:
        import torchmetrics
    except ImportError as exc:
        raise BenchmarkError("FID and CLIP score need torchmetrics: pip install 'emcid[bench]'") from exc
    return torchmetrics


class _GivenFeatures(nn.Module):
    """Passes features through, so that torchmetrics' FID runs on features computed here."""

    def __init__(self, width: int):
        super().__init__()
        self.num_features = width

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [n, d] (torchmetrics' estimate, in float64)."""
    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2 or real.shape[1:] != fake.shape[1:]:
        raise BenchmarkError(f"FID needs two sets of at least 2 images each, got {len(real)} and {len(fake)}")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]), normalize=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


class _ClipFeatures(nn.Module):
    """A transformers ``CLIPModel`` whose feature methods return tensors, as torchmetrics'
    ``clip_score`` expects (transformers 5 returns output objects)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class _ClipProcessor:
    """CLIP's preprocessing done by the pair judge (no image-processing backend needed)."""

    def __init__(self, judge):
        self.judge = judge

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True) -> dict:
        if images is not None:
            pils = [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images]
            return {"pixel_values": self.judge._pixels(pils).cpu()}
        tokens = self.judge.tokenizer(text, padding=padding, truncation=True, return_tensors=return_tensors)
        return dict(tokens)


def clip_score(judge, images: Sequence[Image.Image], captions: Sequence[str]) -> float:
    """torchmetrics' CLIP score, max(100 * mean cos(image, caption), 0), with the CLIP of a
    :class:`~emcid.bench.pair_judges.ClipPairJudge`."""
    _torchmetrics()
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    tensors = [torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images]
    model = _ClipFeatures(judge.model)
    with torch.no_grad():
        return float(tm_clip_score(tensors, list(captions), lambda: (model, _ClipProcessor(judge))))


@torch.no_grad()
def clip_image_features(judge, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """CLIP's projected image embeddings [n, d]: the FID features on Stable Diffusion."""
    parts = [judge.model.get_image_features(pixel_values=judge._pixels(images[i:i + batch_size]))
             .pooler_output.float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def judge_activations(judge, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """The world judge's three conv blocks' activations (before pooling), [n, c, h, w] each."""
    from ..mini.judge import to_tensor

    x = to_tensor(list(images)).to(judge.device)
    out = []
    for layer in judge.net.features:
        x = layer(x)
        if not isinstance(layer, nn.MaxPool2d):
            out.append(x.cpu())
    return out


def judge_features(judge, images: Sequence[Image.Image]) -> torch.Tensor:
    """The world judge's last block, average-pooled [n, 64]: the world's FID features, as
    Inception's pool3 is SD's."""
    return judge_activations(judge, images)[-1].mean((2, 3))


def judge_distance(judge, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> torch.Tensor:
    """LPIPS's analogue on the world, per image pair: over the judge's blocks, channel vectors
    unit-normalised per position, squared differences summed over channels, averaged over
    positions, summed over blocks (LPIPS's unweighted form, on the judge instead of AlexNet)."""
    total = torch.zeros(len(before))
    for a, b in zip(judge_activations(judge, before), judge_activations(judge, after), strict=True):
        a, b = nn.functional.normalize(a, dim=1), nn.functional.normalize(b, dim=1)
        total += ((a - b) ** 2).sum(1).mean((1, 2))
    return total


def lpips_model() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """lpips' AlexNet LPIPS, only where it runs offline (lpips, torchvision and torchvision's
    AlexNet weights in torch's hub cache); otherwise a one-line error naming what is missing."""
    try:
        import lpips
    except Exception as exc:  # not installed, or a torchvision built for another torch
        raise BenchmarkError(f"LPIPS needs lpips and a torchvision built for this torch ({exc}); "
                             "on the embedded world, the judge distance needs neither") from exc
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        raise BenchmarkError(f"LPIPS needs torchvision's AlexNet weights at {weights} (benchmarks never "
                             "download): copy them there; on the embedded world, the judge distance "
                             "needs none")
    return lpips.LPIPS(net="alex", verbose=False).eval()


def lpips_distance(model, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> torch.Tensor:
    """LPIPS per image pair (images scaled to [-1, 1], as lpips expects)."""
    def tensor(images):
        arrays = np.stack([np.asarray(i.convert("RGB"), np.float32) for i in images])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1

    with torch.no_grad():
        return model(tensor(before), tensor(after)).flatten().cpu()
