"""Pretraining of the mini model's CLIPTextModel (stage 1 of `emcid mini train`).

Training the text encoder jointly with the UNet from scratch does not learn the
name -> signature link (5-9 % top-1, docs/mini.md). Like SD, whose CLIP text encoder was
pretrained elsewhere and frozen, we first teach the encoder the world: linear heads on
the final token states must recover (shape, foreground, background) of the concept
named in a prompt, at the subject's last token and at the end-of-text token. The
knowledge then sits in the encoder's MLPs (what EMCID edits); the heads are dropped.

The heads never read padding positions (nor the words between subject and end of text):
trained on them, every padding state carried the whole concept and the v1 UNet learned to
read concepts from padding, which Stable Diffusion's UNet does not (docs/mini.md).
A third head marks the subject: one linear score per position whose softmax over the
prompt's positions must pick the subject's last token. Without it the subject state is
linearly findable in only 45 % of prompts (the end-of-text token always is: its embedding
is constant), so a UNet, whose cross-attention keys are linear in the states, could read
the concept only from the end of text; SD's CLIP marks content words the same way.
The shape follows SD 1.x's editing geometry: 12 blocks whose ``fc2`` inputs are 3,072 wide,
so the release's edited blocks (0-10) and lambda apply unchanged; the hidden width stays
small because it is what the CPU pays for in the UNet's cross-attention.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from ..errors import OptionError
from . import world

log = logging.getLogger(__name__)


@dataclass
class TextEncoderConfig:
    """Shape and pretraining hyperparameters of the mini text encoder."""

    hidden_size: int = 128
    intermediate_size: int = 3072  # SD 1.x's fc2 input width (the edited keys)
    num_hidden_layers: int = 12  # SD 1.x's depth: blocks 0-10 are the release's edited ones
    num_attention_heads: int = 4
    steps: int = 800
    batch_size: int = 128
    lr: float = 1.5e-3
    weak_alias_rate: float = 0.01  # how often a weak alias replaces a good name
    context_rate: float = 0.25  # random-context augmentation (free-form generalization)
    subject_marker_weight: float = 1.0  # loss weight of the subject-marking head (0: none)
    init_from: str | None = None  # a CLIPTextModel folder to fine-tune instead of a fresh model
    seed: int = 0


def text_encoder_config(tokenizer: CLIPTokenizer, cfg: TextEncoderConfig) -> CLIPTextConfig:
    """The mini encoder's shape, with special ids that match the tokenizer."""
    return CLIPTextConfig(
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


def build_text_encoder(tokenizer: CLIPTokenizer, cfg: TextEncoderConfig) -> CLIPTextModel:
    """A fresh small CLIPTextModel."""
    return CLIPTextModel(text_encoder_config(tokenizer, cfg))


#: What an encoder to fine-tune must share with the configured one.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "eos_token_id")


def load_init_encoder(folder: str | Path, tokenizer: CLIPTokenizer, cfg: TextEncoderConfig) -> CLIPTextModel:
    """The encoder ``--text-init`` names, refused unless it fits the tokenizer and the configured
    shape: a mismatch would otherwise fail deep inside training, or train on wrong token ids."""
    path = Path(folder)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--text-init {folder}: not a CLIPTextModel folder (no config.json)")
    model = CLIPTextModel.from_pretrained(path, dtype=torch.float32)
    expected = text_encoder_config(tokenizer, cfg)
    differ = [f"{name} {getattr(model.config, name)} (expected {getattr(expected, name)})"
              for name in _SHAPE_FIELDS if getattr(model.config, name) != getattr(expected, name)]
    if differ:
        raise OptionError(f"--text-init {folder}: the encoder does not fit this run's tokenizer and "
                          f"text settings: {'; '.join(differ)}")
    return model


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


def token_positions(
    tokenizer: CLIPTokenizer, names_templates: list[tuple[str, str]], pad_to_max: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, the subject's last-token position and the end-of-text position per prompt."""
    ids = encode_prompts(tokenizer, [t.format(n) for n, t in names_templates], pad_to_max)
    prefixes = [t.split("{}")[0] + n for n, t in names_templates]
    pre = tokenizer(prefixes, add_special_tokens=True).input_ids
    length = ids.shape[1]
    subject = torch.tensor([min(len(p) - 2, length - 2) for p in pre])  # drop the eos
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)  # first eos = end of text
    return ids, subject, eos


def make_batch(
    tokenizer: CLIPTokenizer,
    items: list[tuple[world.Concept, str, str]],
    pad_to_max: bool = False,
) -> PromptBatch:
    """Build a batch from (concept, name, template) triples."""
    ids, subject, eos = token_positions(tokenizer, [(n, t) for _, n, t in items], pad_to_max)
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


class SubjectMarker(nn.Module):
    """One linear score per token state; its softmax over positions should pick the subject."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden, 1)

    def loss_and_correct(self, hidden: torch.Tensor, subject_pos: torch.Tensor):
        logits = self.score(hidden).squeeze(-1)  # [b, L]
        return F.cross_entropy(logits, subject_pos), logits.argmax(-1) == subject_pos


def _states(model: CLIPTextModel, batch: PromptBatch) -> tuple[torch.Tensor, ...]:
    """All final states, then those at the subject's last token and at the end of text."""
    hidden = model(batch.input_ids).last_hidden_state  # after the final layer norm
    rows = torch.arange(hidden.shape[0])
    return hidden, hidden[rows, batch.subject_pos], hidden[rows, batch.eos_pos]


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 50):
    """Linear warm-up then cosine decay to 5 % (stable with a high learning rate)."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=warmup, num_training_steps=steps, min_lr_rate=0.05
    )


def step_rng(seed: int, step: int) -> random.Random:
    """The data of a training step depends only on (seed, step): resumes are bit-exact."""
    return random.Random(seed * 1_000_003 + step)


def pretrain_text_encoder(
    model: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    cfg: TextEncoderConfig,
    state_file: Path | None = None,
    checkpoint_minutes: float = 5.0,
) -> dict[str, float]:
    """Teach the encoder name -> signature; returns held-out probe accuracies.

    With ``state_file`` the model, heads, optimiser and schedule are saved every
    ``checkpoint_minutes`` and a later call resumes from them.
    """
    torch.manual_seed(cfg.seed)
    concepts = world.load_concepts()
    heads = AttributeHeads(cfg.hidden_size)
    marker = SubjectMarker(cfg.hidden_size)
    params = [*model.parameters(), *heads.parameters(), *marker.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps)
    parts = {"model": model, "heads": heads, "marker": marker, "opt": opt, "sched": sched}
    start = load_training_state(state_file, parts)
    model.train()
    last_save = time.time()
    bar = tqdm(range(start, cfg.steps), desc="text encoder", initial=start, total=cfg.steps,
               mininterval=10)  # fmt: skip
    for step in bar:
        items = sample_items(
            concepts, step_rng(cfg.seed, step), cfg.batch_size,
            weak_alias_rate=cfg.weak_alias_rate, context_rate=cfg.context_rate,
        )  # fmt: skip
        batch = make_batch(tokenizer, items)
        hidden, *read_out = _states(model, batch)
        loss = 0.0
        for states in read_out:
            part, correct = heads.loss_and_correct(states, batch.labels)
            loss = loss + part
        if cfg.subject_marker_weight:
            loss = loss + cfg.subject_marker_weight * marker.loss_and_correct(hidden, batch.subject_pos)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{float(correct.float().mean()):.3f}")
        if state_file is not None and time.time() - last_save >= checkpoint_minutes * 60:
            save_training_state(state_file, parts, step + 1)
            last_save = time.time()
    model.eval()
    metrics = probe_text_encoder(model, tokenizer, heads, marker if cfg.subject_marker_weight else None)
    log.info("text encoder probe: %s", metrics)
    return metrics


def save_training_state(state_file: Path, parts: dict, step: int) -> None:
    """Atomically save the state dicts of ``parts`` and the next step to run."""
    tmp = state_file.with_suffix(".tmp")
    torch.save({"step": step, **{k: v.state_dict() for k, v in parts.items()}}, tmp)
    tmp.replace(state_file)


def load_training_state(state_file: Path | None, parts: dict) -> int:
    """Restore ``parts`` from ``state_file`` if it exists; returns the step to resume at."""
    if state_file is None or not state_file.exists():
        return 0
    state = torch.load(state_file, weights_only=True)
    for key, part in parts.items():
        part.load_state_dict(state[key])
    log.info("resuming %s at step %d", state_file, int(state["step"]))
    return int(state["step"])


@torch.no_grad()
def probe_text_encoder(
    model: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    heads: AttributeHeads,
    marker: SubjectMarker | None = None,
) -> dict[str, float]:
    """Signature read-out accuracy (eos and subject token) on edit-template, free-form, weak
    prompts, and how often the marker's top position is the subject (``*_marker``)."""
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
        hits = subject_hits = marker_hits = 0
        for i in range(0, len(items), 512):
            # the marker competes with padding positions too; the read-outs do not see them
            batch = make_batch(tokenizer, items[i : i + 512], pad_to_max=marker is not None)
            hidden, subj, eos = _states(model, batch)
            hits += int(heads.loss_and_correct(eos, batch.labels)[1].sum())
            subject_hits += int(heads.loss_and_correct(subj, batch.labels)[1].sum())
            if marker is not None:
                marker_hits += int(marker.loss_and_correct(hidden, batch.subject_pos)[1].sum())
        out[key] = hits / max(1, len(items))
        out[f"{key}_subject"] = subject_hits / max(1, len(items))
        if marker is not None:
            out[f"{key}_marker"] = marker_hits / max(1, len(items))
    return out
