"""The judge of the mini world: a small CNN giving a probability over the 2,000 concepts.

It plays the role ViT-B/16 plays for SD in ICEB. Its logits are factorised over the
signature, logit(c) = s[shape_c] + f[fg_c] + b[bg_c] + r[c], so that every attribute is
learned from all concepts that share it (fast, and robust on imperfect samples). It is
trained on renders with noise, blur and colour jitter so that it is fair to generated
images (we measured +4-14 points of accuracy on samples from this augmentation).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import default_judge_dir, styles, world

log = logging.getLogger(__name__)

JUDGE_SIZE = 32


@dataclass
class JudgeConfig:
    """Judge shape and training hyperparameters."""

    width: int = 16
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


class JudgeNet(nn.Module):
    """Conv net with signature-factorised logits over all concepts."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(
            block(3, w), nn.MaxPool2d(2),  # 16
            block(w, 2 * w), nn.MaxPool2d(2),  # 8
            block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4
        )  # fmt: skip
        self.colour = nn.Linear(3 * 4, 2 * len(world.PALETTE))  # fg/bg also from mean colours
        feat = 4 * w * 4 * 4
        self.shape_head = nn.Linear(feat, len(world.SHAPES))
        self.fg_head = nn.Linear(feat, len(world.PALETTE))
        self.bg_head = nn.Linear(feat, len(world.PALETTE))
        concepts = world.load_concepts()
        self.register_buffer("c_shape", torch.tensor([c.shape for c in concepts]), persistent=False)
        self.register_buffer("c_fg", torch.tensor([c.fg for c in concepts]), persistent=False)
        self.register_buffer("c_bg", torch.tensor([c.bg for c in concepts]), persistent=False)

    def attribute_logits(self, x: torch.Tensor):
        """Logits of shape, foreground and background; x in [-1, 1], [n, 3, 32, 32]."""
        h = self.features(x).flatten(1)
        # colour statistics: centre and border means help the palette heads
        centre = x[:, :, 10:22, 10:22].mean((2, 3))
        border = torch.cat([x[:, :, :3].flatten(2), x[:, :, -3:].flatten(2)], 2).mean(2)
        col = self.colour(torch.cat([centre, border, centre - border, centre * border], 1))
        n = len(world.PALETTE)
        return self.shape_head(h), self.fg_head(h) + col[:, :n], self.bg_head(h) + col[:, n:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concept logits [n, 2000]."""
        s, f, b = self.attribute_logits(x)
        return s[:, self.c_shape] + f[:, self.c_fg] + b[:, self.c_bg]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> [n, 3, 32, 32] in [-1, 1] (resized if needed)."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (JUDGE_SIZE, JUDGE_SIZE):
            im = im.resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BILINEAR)
        arrs.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and colour jitter, so that imperfect samples are judged fairly."""
    n = x.shape[0]
    # blur with a random-strength 3x3 kernel on part of the batch
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    a = torch.rand(n, 1, 1, 1, generator=gen)
    x = torch.where(a < 0.5, x, x + (blurred - x) * (2 * a - 1) * 1.0)
    # per-channel colour shift and contrast
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5))
    x = x + 0.2 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    # gaussian noise of random strength
    sigma = 0.2 * torch.rand(n, 1, 1, 1, generator=gen)
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


class Judge:
    """Classifier of the world; `predict_proba` returns softmax over the 2,000 concepts."""

    def __init__(self, net: JudgeNet, device: str = "cpu") -> None:
        self.net = net.to(device).eval()
        self.device = device
        self.class_names = [c.name for c in world.load_concepts()]

    @torch.no_grad()
    def _batched(self, images: list[Image.Image], logits, width: int, batch_size: int) -> torch.Tensor:
        outs = [logits(to_tensor(images[i : i + batch_size]).to(self.device)).softmax(-1).cpu()
                for i in range(0, len(images), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, width)

    def predict_proba(self, images: list[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """Probabilities [n, 2000], index-aligned with load_concepts()."""
        return self._batched(images, self.net, len(self.class_names), batch_size)

    def background_proba(self, images: list[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """Probabilities [n, 27] of each palette colour being the background (what the
        world's styles and colour words change)."""
        return self._batched(images, lambda x: self.net.attribute_logits(x)[2], len(world.PALETTE),
                             batch_size)


class ColourWordJudge:
    """Debias classifier of the embedded world: scores each image against each label by the
    judge's belief that its background is the label's colour word ("a teal tench" -> teal)."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def __call__(self, images: list[Image.Image], labels: list[str]) -> torch.Tensor:
        colours = [styles.colour_of_phrase(label) for label in labels]
        return self.judge.background_proba(images)[:, colours]


def save_judge(net: JudgeNet, folder: str | Path, cfg: JudgeConfig) -> None:
    """Write judge.safetensors and config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "judge.safetensors"))
    (folder / "config.json").write_text(json.dumps(asdict(cfg), indent=1))


def load_judge(device: str = "cpu", folder: str | Path | None = None) -> Judge:
    """Load the shipped judge (or one from `folder`)."""
    folder = Path(folder) if folder is not None else default_judge_dir()
    cfg = JudgeConfig(**json.loads((folder / "config.json").read_text()))
    net = JudgeNet(cfg.width)
    net.load_state_dict(load_file(str(folder / "judge.safetensors")))
    return Judge(net, device)


def render_bank(n_variants: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 renders [2000 * n_variants, 3, size, size]; row = concept * n_variants + k."""
    concepts = world.load_concepts()
    out = np.empty((len(concepts) * n_variants, size, size, 3), dtype=np.uint8)
    for c in tqdm(concepts, desc="rendering", mininterval=5):
        for k in range(n_variants):
            out[c.index * n_variants + k] = np.asarray(
                world.render(c.index, seed * 1_000_003 + k, size)
            )
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def train_judge(
    cfg: JudgeConfig, extra_images: torch.Tensor | None = None, extra_labels=None
) -> tuple[JudgeNet, dict[str, float]]:
    """Train on fresh renders with augmentation; returns the net and clean accuracy.

    extra_images (float in [-1, 1]) with labels, e.g. VAE reconstructions, are mixed in.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    net = JudgeNet(cfg.width)
    n_var = 8
    bank = render_bank(n_var, seed=cfg.seed + 1)
    labels = torch.arange(len(world.load_concepts())).repeat_interleave(n_var)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(cfg.steps, 2))
    net.train()
    bar = tqdm(range(cfg.steps), desc="judge", mininterval=5)
    for _ in bar:
        idx = torch.tensor([rng.randrange(len(bank)) for _ in range(cfg.batch_size)])
        x = bank[idx].float() / 127.5 - 1
        y = labels[idx]
        if rng.random() < 0.5:  # random flips/rot90 of the canvas keep the signature
            x = torch.rot90(x, rng.randrange(4), (2, 3))
        if extra_images is not None:
            j = torch.randint(len(extra_images), (cfg.batch_size // 4,), generator=gen)
            x = torch.cat([x, extra_images[j]])
            y = torch.cat([y, extra_labels[j]])
        x = augment(x, gen)
        loss = F.cross_entropy(net(x), y)
        s, f, b = net.attribute_logits(x)
        loss = loss + 0.3 * (
            F.cross_entropy(s, net.c_shape[y]) + F.cross_entropy(f, net.c_fg[y])
            + F.cross_entropy(b, net.c_bg[y])
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    net.eval()
    acc = judge_accuracy(Judge(net), n_per_concept=2, seed=cfg.seed + 99)
    log.info("judge clean accuracy %.4f", acc)
    return net, {"clean_top1": acc}


def judge_accuracy(judge: Judge, n_per_concept: int = 1, seed: int = 12345) -> float:
    """Top-1 of the judge on fresh clean renders of every concept."""
    concepts = world.load_concepts()
    images = [world.render(c.index, seed + k) for c in concepts for k in range(n_per_concept)]
    labels = torch.arange(len(concepts)).repeat_interleave(n_per_concept)
    pred = judge.predict_proba(images).argmax(-1)
    return float((pred == labels).float().mean())
