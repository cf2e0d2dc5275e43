"""ReFACT (Arad, Orgad and Belinkov, NAACL 2024): a rank-one edit of one text encoder MLP.

Per request, a vector ``delta`` is added to the output of ``fc2`` in block ``layer`` at the
subject's last token, and optimised so that the pooled text output of the source prompts
moves to the unedited model's pooled output of the destination word and away from the
source word (contrastive loss over the two, L2 distances as logits). ``delta`` is then
written into ``fc2`` as the ROME rank-one update

    u = C^{-1} k_mean / ||C^{-1} k_mean||,   dW = delta u^T / (u . k),

with ``k_mean`` the subject's key averaged over the request's prompts, ``k`` its key in the
first prompt and ``C = E[k k^T]`` the preservation statistics; so ``dW k = delta`` and keys
C-orthogonal to ``k_mean`` are untouched. Several requests are edited one after another, each
on the model already holding the earlier ones, as ReFACT does.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.bundle import ModelBundle
from ..core.chain import base_weights
from ..core.config import check_corpus, check_float, check_int
from ..core.hooks import add_at_positions, capture
from ..core.stats import DEFAULT_SAMPLES, read_corpus, second_moments
from ..core.tokens import subject_positions
from ..core.weights import add_weights, restored
from ..errors import OptionError
from ..requests.edit import EditRequest
from .base import ConfiguredEditor


@dataclass
class ReFACTConfig:
    """Defaults are ReFACT's released values (text-target variant, L2 similarity)."""

    layer: int | None = None  # None: a third of the depth (4 of 12 for CLIP ViT-L)
    steps: int = 100  # release: at most 100 steps
    lr: float = 0.5  # release: Adam 0.5
    weight_decay: float = 0.1  # release: 0.1 * ||delta|| / ||v_init||^2
    clamp_factor: float = 4.0  # release: ||delta|| <= 4 ||v_init||
    prob_threshold: float = 0.99  # release: stop once P(destination) exceeds this
    stats_samples: int = DEFAULT_SAMPLES
    corpus: str | None = None  # caption file for the statistics; None: the default corpus

    def __post_init__(self) -> None:
        if self.layer is not None:
            check_int("ReFACT", "layer", self.layer, minimum=0)
        check_int("ReFACT", "steps", self.steps)
        check_int("ReFACT", "stats_samples", self.stats_samples)
        for name in ("lr", "clamp_factor"):
            check_float("ReFACT", name, getattr(self, name), low=0, low_open=True)
        check_float("ReFACT", "weight_decay", self.weight_decay, low=0)
        check_float("ReFACT", "prob_threshold", self.prob_threshold, low=0, high=1)


def default_layer(bundle: ModelBundle) -> int:
    return bundle.slots()[0].num_layers // 3


def rank_one_update(key: torch.Tensor, key_mean: torch.Tensor, delta: torch.Tensor,
                    second_moment: torch.Tensor) -> torch.Tensor:
    """ROME's closed form: ``dW`` (out x in) with ``dW key = delta``, float64."""
    direction = torch.linalg.solve(second_moment.double(), key_mean.double())
    direction = direction / direction.norm()
    return torch.outer(delta.double() / (direction @ key.double()), direction)


def _contrastive_loss(pooled: torch.Tensor, destination: torch.Tensor,
                      source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-log P(destination) with negative L2 distances as logits; also P(destination) per row."""
    candidates = torch.stack([destination, source])
    log_probs = torch.log_softmax(-torch.cdist(pooled.float(), candidates.float()), dim=1)[:, 0]
    return -log_probs.mean(), log_probs.detach().exp()


def optimise_delta(bundle: ModelBundle, request: EditRequest, layer: int,
                   config: ReFACTConfig) -> dict[str, torch.Tensor]:
    """ReFACT's value search: one ``delta`` per text encoder at ``fc2``'s output (width,)."""
    prompts = request.source_prompts()
    positions = {s.name: subject_positions(s.tokenizer, request.prompts, request.source)
                 for s in bundle.slots()}
    with torch.no_grad():
        words = bundle.encode([request.destination, request.source]).pooled
        with capture({s.name: s.fc2(layer) for s in bundle.slots()}) as outputs:
            bundle.encode(prompts[:1])
    initial_norm = {name: out[0][0, positions[name][0]].norm() for name, out in outputs.items()}
    deltas = {s.name: torch.zeros(s.hidden_size, device=bundle.device, requires_grad=True)
              for s in bundle.slots()}
    optimiser = torch.optim.Adam(list(deltas.values()), lr=config.lr)
    for _ in range(config.steps):
        with ExitStack() as stack:
            for slot in bundle.slots():
                stack.enter_context(add_at_positions(slot.fc2(layer), positions[slot.name],
                                                     deltas[slot.name]))
            pooled = bundle.encode(prompts).pooled
        losses, probs = zip(*(_contrastive_loss(p, w[0], w[1]) for p, w in zip(pooled, words)))
        if min(float(p.mean()) for p in probs) > config.prob_threshold:
            break
        loss = sum(losses) + sum(config.weight_decay * d.norm() / initial_norm[n] ** 2
                                 for n, d in deltas.items())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            for name, delta in deltas.items():
                limit = config.clamp_factor * initial_norm[name]
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    return {name: delta.detach() for name, delta in deltas.items()}


def subject_keys(bundle: ModelBundle, request: EditRequest, layer: int) -> dict[str, torch.Tensor]:
    """The input of ``fc2`` at the subject's last token in every source prompt: (n, in)."""
    keys = {}
    for slot in bundle.slots():
        positions = subject_positions(slot.tokenizer, request.prompts, request.source)
        with torch.no_grad(), capture({"k": slot.fc2(layer)}, positions, what="input") as records:
            bundle.encode(request.source_prompts())
        keys[slot.name] = records["k"][0]
    return keys


class ReFACTEditor(ConfiguredEditor):
    name = "refact"
    config_class = ReFACTConfig
    runtime_options = frozenset({"cache", "cache_root"})

    def layer_for(self, bundle: ModelBundle) -> int:
        layer = default_layer(bundle) if self.config.layer is None else self.config.layer
        depth = min(s.num_layers for s in bundle.slots())
        if not 0 <= layer < depth:
            raise OptionError(f"refact layer {layer}: choose from 0..{depth - 1}")
        return layer

    def check(self, bundle: ModelBundle) -> None:
        self.layer_for(bundle)
        check_corpus(self.config.corpus)

    def compute(self, bundle: ModelBundle, requests: list[EditRequest], progress: bool) -> dict:
        config = self.config
        layer = self.layer_for(bundle)
        names = {s.name: s.fc2_name(layer) for s in bundle.slots()}
        corpus = read_corpus(Path(config.corpus)) if config.corpus else None
        with base_weights(bundle):  # a patched model's statistics are its base model's
            moments = second_moments(bundle, list(names.values()), corpus, config.stats_samples,
                                     cache=self.cache("stats"), progress=progress)
        modules = {s.name: s.fc2(layer) for s in bundle.slots()}
        totals = {name: torch.zeros_like(m.weight, dtype=torch.float64) for name, m in modules.items()}
        with restored(bundle, names.values()):  # sequential edits write into the live weights
            for request in tqdm(requests, desc="ReFACT", unit="edit", disable=not progress):
                deltas = optimise_delta(bundle, request, layer, config)
                keys = subject_keys(bundle, request, layer)
                for name in modules:
                    update = rank_one_update(keys[name][0], keys[name].mean(0), deltas[name],
                                             moments[names[name]])
                    totals[name] += update.to(totals[name].device)
                    add_weights(bundle, {names[name]: update})
        return {names[name]: total.float().cpu() for name, total in totals.items()}
