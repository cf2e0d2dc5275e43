"""Fine-tuning the mini text encoder so that styles are readable (`emcid mini train --style-steps`).

The pretrained encoder gives a concept the same state whatever words surround it, and the
words after the subject carry the subject: in "<object Y> in the style of X", the state at X's
last token reads as Y (linear probes: Y's shape 0.79, Y's foreground 0.80, X's background
0.11), so no UNet can draw Y on X's colour from it (docs/mini.md). This stage teaches the
encoder the composition, as SD's CLIP knows that "by Monet" changes how a scene is painted:

- "<object Y> in the style of X": at X's last token and at the end of text, linear probes read
  (Y's shape, Y's foreground, X's background);
- "painting by X" (and the release's other artist prompts) alone: X's background there;
- every plain prompt and every colour-word prompt keeps its states (distillation to the
  frozen original at every position), so the UNet, the statistics and the judge's world stay
  those of the original encoder as far as the objective can hold them.

The probes are fitted once, on the frozen original's plain prompts, and never trained with
the encoder: the new states must be readable the way the old ones were.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from . import styles, world
from .text_encoder import (
    AttributeHeads,
    encode_prompts,
    load_training_state,
    sample_items,
    save_training_state,
    step_rng,
    token_positions,
    warmup_cosine,
)

log = logging.getLogger(__name__)

Labelled = tuple[list[tuple[str, str]], torch.Tensor]


@dataclass
class StyleTuneConfig:
    """Steps and weights of the style fine-tune (0 steps: the stage is skipped)."""

    steps: int = 0
    batch_size: int = 48  # styled prompts per step; plain, colour-word and style-alone ones too
    lr: float = 5e-4
    distill_weight: float = 30.0  # relative MSE to the original's states of unchanged prompts
    probe_steps: int = 120  # fitting the frozen read-out probes on the original encoder
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 2 or self.lr <= 0 or self.distill_weight < 0:
            raise ValueError(f"style fine-tune: steps must be >= 0, batch_size >= 2, lr > 0 and "
                             f"distill_weight >= 0 (got {self.steps}, {self.batch_size}, {self.lr}, "
                             f"{self.distill_weight})")


def _escaped(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def styled_items(concepts: list[world.Concept], rng: random.Random, n: int) -> Labelled:
    """``n`` "<template(Y)> in the style of {}" prompts (X to fill in) with the labels
    (Y's shape, Y's foreground, X's background); only pairs the world can draw."""
    items, labels = [], []
    while len(items) < n:
        obj, style = concepts[rng.randrange(len(concepts))], concepts[rng.randrange(len(concepts))]
        if not styles.can_draw_on(obj, style.bg):
            continue
        prompt = rng.choice(world.TRAIN_TEMPLATES).format(rng.choice(obj.good_names))
        items.append((rng.choice(style.good_names), styles.STYLED_OBJECT.format(_escaped(prompt), "{}")))
        labels.append([obj.shape, obj.fg, style.bg])
    return items, torch.tensor(labels)


def style_alone_items(concepts: list[world.Concept], rng: random.Random, n: int) -> Labelled:
    """``n`` artist prompts of the release ("painting by {}", ...) with the style's background."""
    chosen = [concepts[rng.randrange(len(concepts))] for _ in range(n)]
    items = [(rng.choice(c.good_names), rng.choice(styles.STYLE_PROMPTS)) for c in chosen]
    return items, torch.tensor([c.bg for c in chosen])


def unchanged_prompts(concepts: list[world.Concept], rng: random.Random, n: int) -> list[str]:
    """Prompts whose states must not move: ``n`` plain ones and ``n // 2`` with a colour word."""
    plain = [t.format(name) for _, name, t in sample_items(concepts, rng, n, context_rate=0.25)]
    words = sorted(styles.COLOUR_WORDS)
    coloured = []
    for _ in range(n // 2):
        concept, template = concepts[rng.randrange(len(concepts))], rng.choice(world.TRAIN_TEMPLATES)
        phrase = f"{rng.choice(words)} {rng.choice(concept.good_names)}"
        coloured.append(template.format(styles.with_article(template, phrase)))
    return plain + coloured


def _read_points(model: CLIPTextModel, tokenizer: CLIPTokenizer,
                 items: list[tuple[str, str]]) -> torch.Tensor:
    """States at the named word's last token and at the end of text, stacked: [2b, hidden]."""
    ids, named, eos = token_positions(tokenizer, items, pad_to_max=False)
    hidden = model(ids).last_hidden_state
    rows = torch.arange(len(items))
    return torch.cat([hidden[rows, named], hidden[rows, eos]])


def fit_probes(original: CLIPTextModel, tokenizer: CLIPTokenizer, concepts: list[world.Concept],
               steps: int, seed: int) -> AttributeHeads:
    """Linear read-outs of (shape, fg, bg) fitted on the frozen original's plain prompts."""
    torch.manual_seed(seed)
    probes = AttributeHeads(original.config.hidden_size)
    opt = torch.optim.Adam(probes.parameters(), lr=3e-3)
    rng = random.Random(f"style-probes-{seed}")
    for _ in range(steps):
        items = sample_items(concepts, rng, 256)
        with torch.no_grad():
            states = _read_points(original, tokenizer, [(name, t) for _, name, t in items])
        labels = torch.tensor([[c.shape, c.fg, c.bg] for c, _, _ in items])
        loss, _ = probes.loss_and_correct(states, torch.cat([labels, labels]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probes.requires_grad_(False).eval()


def _relative_change(model: CLIPTextModel, original: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        reference = original(ids).last_hidden_state
    return F.mse_loss(model(ids).last_hidden_state, reference) / reference.pow(2).mean()


def style_losses(model: CLIPTextModel, original: CLIPTextModel, tokenizer: CLIPTokenizer,
                 probes: AttributeHeads, concepts: list[world.Concept], rng: random.Random,
                 cfg: StyleTuneConfig) -> dict[str, torch.Tensor]:
    """One step's three terms: composition, style alone, distillation."""
    items, labels = styled_items(concepts, rng, cfg.batch_size)
    compose, _ = probes.loss_and_correct(_read_points(model, tokenizer, items), torch.cat([labels, labels]))
    alone, colours = style_alone_items(concepts, rng, max(1, cfg.batch_size // 2))
    alone_logits = probes.bg(_read_points(model, tokenizer, alone))
    alone_loss = F.cross_entropy(alone_logits, torch.cat([colours, colours]))
    ids = encode_prompts(tokenizer, unchanged_prompts(concepts, rng, cfg.batch_size), pad_to_max=False)
    return {"compose": compose, "alone": alone_loss, "distill": _relative_change(model, original, ids)}


def tune_for_styles(model: CLIPTextModel, tokenizer: CLIPTokenizer, cfg: StyleTuneConfig,
                    state_file: Path | None = None, checkpoint_minutes: float = 5.0) -> dict[str, float]:
    """Fine-tune ``model`` in place (every weight); returns :func:`probe_styles` figures.

    The data of a step depends only on (seed, step) and the state is saved every
    ``checkpoint_minutes``, so an interrupted run resumes where it stopped.
    """
    concepts = world.load_concepts()
    original = copy.deepcopy(model).eval().requires_grad_(False)
    probes = fit_probes(original, tokenizer, concepts, cfg.probe_steps, cfg.seed)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps, warmup=min(50, cfg.steps // 10))
    parts = {"model": model, "opt": opt, "sched": sched}
    start = load_training_state(state_file, parts)
    last_save = time.time()
    bar = tqdm(range(start, cfg.steps), desc="style encoder", initial=start, total=cfg.steps,
               mininterval=10)
    for step in bar:
        terms = style_losses(model, original, tokenizer, probes, concepts, step_rng(cfg.seed, step), cfg)
        loss = terms["compose"] + terms["alone"] + cfg.distill_weight * terms["distill"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in terms.items()})
        if state_file is not None and time.time() - last_save >= checkpoint_minutes * 60:
            save_training_state(state_file, parts, step + 1)
            last_save = time.time()
    model.eval().requires_grad_(False)
    metrics = probe_styles(model, original, tokenizer, probes)
    log.info("style encoder probe: %s", metrics)
    return metrics


@torch.no_grad()
def probe_styles(model: CLIPTextModel, original: CLIPTextModel, tokenizer: CLIPTokenizer,
                 probes: AttributeHeads, count: int = 400, seed: int = 99) -> dict[str, float]:
    """What the probes read on fresh seeded prompts: the composition at X's token and at the end
    of text (``styled_*``), X's background for a style alone, plain prompts' signature at the
    subject, and how far plain and colour-word prompts' states moved (relative, all positions)."""
    concepts = world.load_concepts()
    rng = random.Random(f"style-probe-{seed}")
    items, labels = styled_items(concepts, rng, count)
    states = _read_points(model, tokenizer, items).chunk(2)
    out = {}
    for where, at in zip(("x", "end"), states, strict=True):
        for k, head in enumerate(("shape", "fg", "bg")):
            logits = getattr(probes, head)(at)
            out[f"styled_{where}_{head}"] = float((logits.argmax(-1) == labels[:, k]).float().mean())
    alone, colours = style_alone_items(concepts, rng, count)
    hits = probes.bg(_read_points(model, tokenizer, alone)).argmax(-1) == torch.cat([colours, colours])
    out["alone_bg"] = float(hits.float().mean())
    plain = sample_items(concepts, rng, count)
    subject = _read_points(model, tokenizer, [(name, t) for _, name, t in plain]).chunk(2)[0]
    out["plain_subject_all3"] = float(probes.loss_and_correct(
        subject, torch.tensor([[c.shape, c.fg, c.bg] for c, _, _ in plain]))[1].float().mean())
    ids = encode_prompts(tokenizer, unchanged_prompts(concepts, rng, count), pad_to_max=False)
    out["unchanged_relative_mse"] = float(_relative_change(model, original, ids))
    return {k: round(v, 4) for k, v in out.items()}
