"""Baselines that edit the UNet's cross-attention key/value projections in closed form.

Both map the text embedding ``c`` of each source concept (at its subject token) to what the
unedited projection makes of the destination's embedding, ``v* = W c_dst``:

- **TIME** (Orgad et al., 2023): ``W' = (lam W + sum_e v* c^T)(lam I + sum_e c c^T)^{-1}``,
  its paper's equation, at its paper's lam = 0.1.
- **UCE** (Gandikota et al., 2024; :mod:`emcid.editors.uce`) adds concepts to preserve, whose
  outputs are kept, and the scales of both sums; its ``variant`` selects the UCE code whose
  keys, targets and scales it follows.

The keys are the prompt embeddings the UNet sees (SDXL: both encoders' states, concatenated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from ..core.bundle import ModelBundle
from ..core.config import check_float
from ..core.tokens import subject_positions
from ..errors import OptionError
from ..requests.edit import EditRequest
from .base import ConfiguredEditor


@dataclass
class CrossAttentionConfig:
    lam: float = 0.1  # the regulariser towards the original weights (TIME's paper: 0.1)
    preserve: list[str] = field(default_factory=list)  # UCE: concepts whose outputs are kept
    preserve_scale: float = 1.0  # UCE: weight of each preserved concept
    edit_keys: bool = True  # edit to_k as well as to_v (both papers do)

    def __post_init__(self) -> None:
        # lam = 0 leaves sum c c^T, singular for fewer edits than the embedding width.
        check_float("cross-attention", "lam", self.lam, low=0, low_open=True)
        check_float("cross-attention", "preserve_scale", self.preserve_scale, low=0)
        if not isinstance(self.preserve, list | tuple) or not all(isinstance(p, str) for p in self.preserve):
            raise OptionError(f"preserve={self.preserve!r}: give a list of concept names")
        if not isinstance(self.edit_keys, bool):
            raise OptionError(f"edit_keys={self.edit_keys!r}: give true or false")


def _slot_position(tokenizer, template: str, subject: str) -> torch.Tensor:
    """The subject's last token; for an empty subject (an erase), the token after the slot
    (in "An image of {}" the end-of-text token, where the source's subject token stands)."""
    if subject:
        return subject_positions(tokenizer, [template], subject)
    prefix = template[:template.index("{}")]
    return torch.tensor([len(tokenizer(prefix).input_ids) - 1])


@torch.no_grad()
def subject_embeddings(bundle: ModelBundle, prompts: list[str], subjects: list[str],
                       templates: list[str]) -> torch.Tensor:
    """The UNet's text conditioning at each prompt's subject token: (n, width), float64."""
    tokenizer = bundle.slots()[0].tokenizer
    positions = torch.cat([_slot_position(tokenizer, t, s) for t, s in zip(templates, subjects)])
    embeds = bundle.encode(prompts).embeds
    rows = torch.arange(len(prompts), device=embeds.device)
    return embeds[rows, positions.to(embeds.device)].double().cpu()


def edit_embeddings(bundle: ModelBundle, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, destinations): the subject-token embeddings of every request's prompts."""
    src, dst, templates, src_names, dst_names = [], [], [], [], []
    for request in requests:
        src += request.source_prompts()
        dst += request.destination_prompts()
        templates += list(request.prompts)
        src_names += [request.source] * len(request.prompts)
        dst_names += [request.destination] * len(request.prompts)
    return (subject_embeddings(bundle, src, src_names, templates),
            subject_embeddings(bundle, dst, dst_names, templates))


def cross_attention_projections(bundle: ModelBundle, edit_keys: bool) -> dict[str, torch.nn.Linear]:
    """Every ``attn2.to_k`` / ``attn2.to_v`` of the UNet, by pipeline module name."""
    suffixes = ("attn2.to_k", "attn2.to_v") if edit_keys else ("attn2.to_v",)
    return {f"unet.{name}": module for name, module in bundle.unet.named_modules()
            if name.endswith(suffixes)}


def closed_form_update(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       preserved: torch.Tensor, lam: float, edit_scale: float = 1.0,
                       preserve_scale: float = 1.0) -> torch.Tensor:
    """``W' - W`` for ``W' = (lam W + e V^T K + p W P^T P)(lam I + e K^T K + p P^T P)^{-1}``:
    the rows of ``keys`` go to those of ``values``, the preserved rows keep their outputs
    (``weight`` float64, on the CPU)."""
    width = weight.shape[1]
    left = lam * weight + edit_scale * values.T @ keys + preserve_scale * weight @ preserved.T @ preserved
    right = lam * torch.eye(width, dtype=torch.float64) + edit_scale * keys.T @ keys
    right = right + preserve_scale * preserved.T @ preserved
    # W' = left @ right^{-1}; right is symmetric, so solve right X = left^T.
    return torch.linalg.solve(right, left.T).T - weight


class CrossAttentionEditor(ConfiguredEditor):
    """TIME, and the machinery UCE (:mod:`emcid.editors.uce`) shares: subject-token keys,
    ``v* = W c_dst`` targets, one closed form per projection."""

    config_class = CrossAttentionConfig
    uses_preservation = False

    def __init__(self, config: CrossAttentionConfig | None = None, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.config.preserve and not self.uses_preservation:
            raise OptionError(f"{self.name} has no preservation set; use uce")

    def edit_scale(self) -> float:
        """The weight of the edits' sums in the closed form (TIME's paper: 1)."""
        return 1.0

    def solver(self, preserved: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                          torch.Tensor]:
        """``(weight, keys, values) -> W' - W`` of every projection, for one set of preserved rows
        (built once per edit, so UCE's null-space form decomposes them once)."""
        return partial(closed_form_update, preserved=preserved, lam=self.config.lam,
                       edit_scale=self.edit_scale(), preserve_scale=self.config.preserve_scale)

    def compute(self, bundle: ModelBundle, requests: list[EditRequest], progress: bool) -> dict:
        sources, destinations = edit_embeddings(bundle, requests)
        preserved = torch.zeros(0, sources.shape[1], dtype=torch.float64)
        if self.config.preserve:
            names = list(self.config.preserve)
            preserved = subject_embeddings(bundle, names, names, ["{}"] * len(names))
        solve, deltas = self.solver(preserved), {}
        for name, module in cross_attention_projections(bundle, self.config.edit_keys).items():
            weight = module.weight.detach().double().cpu()
            deltas[name] = solve(weight, sources, destinations @ weight.T).float()
        return deltas


class TIMEEditor(CrossAttentionEditor):
    name = "time"
