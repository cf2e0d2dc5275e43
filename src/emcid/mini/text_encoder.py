"""Pretraining of the mini model's CLIPTextModel (stage 1 of `emcid mini train`).

Training the text encoder jointly with the UNet from scratch does not learn the
name -> signature link (issue 3: 5-9 % top-1). Like SD, whose CLIP text encoder was
pretrained elsewhere and frozen, we first teach the encoder the world: linear heads on
the final token states must recover (shape, foreground, background) of the concept
named in a prompt, at the subject token, after it and at the end-of-text token. The
knowledge then sits in the encoder's MLPs (what EMCID edits); the heads are dropped.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import world

log = logging.getLogger(__name__)


@dataclass
class TextEncoderConfig:
    """Shape and pretraining hyperparameters of the mini text encoder."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    steps: int = 1200  # ~8 min on one CPU core
    batch_size: int = 192
    lr: float = 2e-3
    weak_alias_rate: float = 0.01  # how often a weak alias replaces a good name
    context_rate: float = 0.25  # random-context augmentation (free-form generalization)
    seed: int = 0


def build_text_encoder(tokenizer: CLIPTokenizer, cfg: TextEncoderConfig) -> CLIPTextModel:
    """A small CLIPTextModel whose special ids match the tokenizer."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


@dataclass
class PromptBatch:
    """Tokenised prompts with the subject's last-token position and attribute labels."""

    input_ids: torch.Tensor  # [b, L]
    subject_pos: torch.Tensor  # [b]
    eos_pos: torch.Tensor  # [b]
    labels: torch.Tensor  # [b, 3] shape, fg, bg


def encode_prompts(
    tokenizer: CLIPTokenizer, prompts: list[str], pad_to_max: bool = True
) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline builds them.

    With pad_to_max=False the batch is padded only to its longest prompt: the encoder is
    causal, so the states of the real tokens are the same and training runs ~2x faster.
    """
    return tokenizer(
        prompts,
        padding="max_length" if pad_to_max else "longest",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def make_batch(
    tokenizer: CLIPTokenizer,
    items: list[tuple[world.Concept, str, str]],
    pad_to_max: bool = False,
) -> PromptBatch:
    """Build a batch from (concept, name, template) triples."""
    prompts = [t.format(n) for _, n, t in items]
    prefixes = [t.split("{}")[0] + n for _, n, t in items]
    ids = encode_prompts(tokenizer, prompts, pad_to_max)
    pre = tokenizer(prefixes, add_special_tokens=True).input_ids
    L = ids.shape[1]
    subject = torch.tensor([min(len(p) - 2, L - 2) for p in pre])  # drop the eos
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)  # first eos = end of text
    labels = torch.tensor([[c.shape, c.fg, c.bg] for c, _, _ in items])
    return PromptBatch(ids, subject, eos, labels)


def sample_items(
    concepts: list[world.Concept],
    rng: random.Random,
    n: int,
    templates: tuple[str, ...] = world.TRAIN_TEMPLATES,
    weak_alias_rate: float = 0.0,
    context_rate: float = 0.0,
) -> list[tuple[world.Concept, str, str]]:
    """Random training (concept, name, template) triples; weak aliases only rarely.

    With probability context_rate the template's suffix is replaced by 1-5 random words
    of the prompt families, so that the states stay on the concept whatever follows it.
    """
    words = world.context_words()
    out = []
    for _ in range(n):
        c = concepts[rng.randrange(len(concepts))]
        if c.weak_aliases and rng.random() < weak_alias_rate:
            name = rng.choice(c.weak_aliases)
        else:
            name = rng.choice(c.good_names)
        template = rng.choice(templates)
        if context_rate and rng.random() < context_rate:
            tail = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
            template = template.split("{}")[0] + "{} " + tail
        out.append((c, name, template))
    return out


class AttributeHeads(nn.Module):
    """Linear read-out of the signature from token states (discarded after training)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape = nn.Linear(hidden, len(world.SHAPES))
        self.fg = nn.Linear(hidden, len(world.PALETTE))
        self.bg = nn.Linear(hidden, len(world.PALETTE))

    def loss_and_correct(self, states: torch.Tensor, labels: torch.Tensor):
        """Summed cross-entropy and per-row all-three-correct flags."""
        heads = (self.shape, self.fg, self.bg)
        loss = states.new_zeros(())
        correct = torch.ones(states.shape[0], dtype=torch.bool)
        for k, head in enumerate(heads):
            logits = head(states)
            loss = loss + F.cross_entropy(logits, labels[:, k])
            correct &= logits.argmax(-1) == labels[:, k]
        return loss, correct


def _states(model: CLIPTextModel, batch: PromptBatch):
    hidden = model(batch.input_ids).last_hidden_state  # after the final layer norm
    rows = torch.arange(hidden.shape[0])
    subj = hidden[rows, batch.subject_pos]
    eos = hidden[rows, batch.eos_pos]
    # a random token between the subject and the eos (inclusive), to spread the signal
    span = (batch.eos_pos - batch.subject_pos).clamp(min=0)
    offs = (torch.rand(span.shape) * (span + 1).float()).long()
    mid = hidden[rows, batch.subject_pos + offs]
    return subj, eos, mid


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 50):
    """Linear warm-up then cosine decay to 5 % (stable with a high learning rate)."""
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def pretrain_text_encoder(
    model: CLIPTextModel, tokenizer: CLIPTokenizer, cfg: TextEncoderConfig
) -> dict[str, float]:
    """Teach the encoder name -> signature; returns held-out probe accuracies."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    concepts = world.load_concepts()
    heads = AttributeHeads(cfg.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps)
    model.train()
    bar = tqdm(range(cfg.steps), desc="text encoder", mininterval=5)
    for step in bar:
        batch = make_batch(
            tokenizer, sample_items(
                concepts, rng, cfg.batch_size, weak_alias_rate=cfg.weak_alias_rate,
                context_rate=cfg.context_rate,
            )
        )
        subj, eos, mid = _states(model, batch)
        loss = 0.0
        for s in (subj, eos, mid):
            part, correct = heads.loss_and_correct(s, batch.labels)
            loss = loss + part
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{float(correct.float().mean()):.3f}")
    model.eval()
    metrics = probe_text_encoder(model, tokenizer, heads)
    log.info("text encoder probe: %s", metrics)
    return metrics


@torch.no_grad()
def probe_text_encoder(
    model: CLIPTextModel, tokenizer: CLIPTokenizer, heads: AttributeHeads
) -> dict[str, float]:
    """Signature read-out accuracy (eos token) on edit-template, free-form and weak prompts."""
    concepts = world.load_concepts()
    groups: dict[str, list[tuple[world.Concept, str, str]]] = {
        "edit_templates": [(c, c.name, t) for c in concepts for t in world.EDIT_TEMPLATES],
        "aliases": [
            (c, a, world.EDIT_TEMPLATES[1]) for c in concepts for a in c.good_names[1:]
        ],
        "free_form": [
            (c, c.name, t)
            for c in concepts
            for t in random.Random(c.index).sample(world.FREE_FORM_TEMPLATES, 3)
        ],
        "weak_aliases": [(c, a, world.EDIT_TEMPLATES[1]) for c in concepts for a in c.weak_aliases],
    }
    out = {}
    for key, items in groups.items():
        hits = 0
        for i in range(0, len(items), 512):
            batch = make_batch(tokenizer, items[i : i + 512])
            _, eos, _ = _states(model, batch)
            hits += int(heads.loss_and_correct(eos, batch.labels)[1].sum())
        out[key] = hits / max(1, len(items))
    return out
