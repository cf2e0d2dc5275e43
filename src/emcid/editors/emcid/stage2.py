"""Stage II: write every Stage I target into several fc2 layers at once (docs/method.md, Stage II).

Per edited block ``l`` (ascending), with keys ``K`` (fc2 inputs at the subject tokens, one
column per concept), residuals ``R`` and preservation statistics ``C``:

    Delta_l = a R_l K^T (lam (1 - a) C + a K K^T)^{-1}

the minimiser of ``lam (1-a) tr(D C D^T) + a ||(W + D) K - (W K + R_l)||^2``. The residual
is spread over the remaining blocks (``R_l = R / (L - i)``) and recomputed after each
update, so later blocks see the earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from ...config import check_choice, check_float
from ...hooks import capture
from ...models import ModelBundle
from ...requests import subject_positions
from .stage1 import ConceptTarget


@dataclass
class Stage2Config:
    """Stage II hyperparameters; defaults are the release values (docs/method.md)."""

    lam: float = 4000.0  # release: preservation weight 4000 (6000 for RoAD)
    alpha: float = 0.5  # release: editing strength 0.5 (0.6 for arbitrary editing)
    residual: Literal["memit", "release"] = "memit"  # memit: against block l*'s output

    def __post_init__(self) -> None:
        # lam = 0 leaves a K K^T, singular for fewer edits than key width: refused.
        check_float("Stage II", "lam", self.lam, low=0, low_open=True)
        check_float("Stage II", "alpha", self.alpha, low=0, high=1, low_open=True, high_open=True)
        check_choice("Stage II", "residual", self.residual, ("memit", "release"))


def closed_form_update(
    keys: torch.Tensor, residuals: torch.Tensor, second_moment: torch.Tensor, lam: float,
    alpha: float,
) -> torch.Tensor:
    """``a R K^T (lam (1-a) C + a K K^T)^{-1}`` by a float64 linear solve.

    keys: (d_in, e); residuals: (d_out, e); second_moment: (d_in, d_in). Returns (d_out, d_in).
    """
    k = keys.double()
    system = lam * (1 - alpha) * second_moment.double() + alpha * k @ k.T
    # The system is symmetric, so Delta^T = a * system^{-1} K R^T.
    return (alpha * torch.linalg.solve(system, k @ residuals.double().T)).T


def _prompt_batch(targets: list[ConceptTarget], slot_name: str, bundle: ModelBundle):
    """All source prompts of all concepts, their subject positions and owning concept."""
    prompts, positions, owner = [], [], []
    tokenizer = bundle.slot(slot_name).tokenizer
    for i, target in enumerate(targets):
        request = target.request
        prompts += request.source_prompts()
        positions.append(subject_positions(tokenizer, request.prompts, request.source))
        owner += [i] * len(request.prompts)
    return prompts, torch.cat(positions), torch.tensor(owner)


def _mean_by_owner(rows: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """Average rows belonging to the same concept: (count, width)."""
    sums = torch.zeros(count, rows.shape[-1], dtype=torch.float64)
    sums.index_add_(0, owner, rows.double().cpu())
    return sums / torch.bincount(owner, minlength=count).unsqueeze(1)


@torch.no_grad()
def _read_keys_and_current(bundle: ModelBundle, slot_name: str, prompts: list[str],
                           positions: torch.Tensor, fc2: torch.nn.Module, current: torch.nn.Module,
                           batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fc2's input (the keys) and ``current``'s output at the subject tokens, in one pass."""
    keys, outputs = [], []
    encoder = bundle.slot(slot_name)
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        with capture({"k": fc2}, positions[start:stop], "input") as key_records, \
                capture({"c": current}, positions[start:stop], "output") as current_records:
            encoder.encoder(encoder.tokenize(prompts[start:stop]))
        keys.append(key_records["k"][0].float().cpu())
        outputs.append(current_records["c"][0].float().cpu())
    return torch.cat(keys), torch.cat(outputs)


def compute_deltas(
    bundle: ModelBundle,
    targets: list[ConceptTarget],
    layers: dict[str, list[int]],
    second_moments: dict[str, torch.Tensor],
    config: Stage2Config,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The weight delta of every edited fc2, by module name (float32, (d_out, d_in)).

    The model is updated in place while the layers are processed and restored at the end.
    """
    deltas: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    try:
        for slot_name, slot_layers in layers.items():
            slot = bundle.slot(slot_name)
            prompts, positions, owner = _prompt_batch(targets, slot_name, bundle)
            z = torch.cat([t.targets(slot_name) for t in targets])  # per prompt, (n, width)
            z_block = slot.block(max(slot_layers))
            ordered = sorted(slot_layers)
            bar = tqdm(ordered, desc=f"Stage II {slot_name}", disable=not progress)
            for i, layer in enumerate(bar):
                fc2 = slot.fc2(layer)
                name = slot.fc2_name(layer)
                # memit: against block l*'s output; release: against this block's MLP output
                reference = z_block if config.residual == "memit" else fc2
                keys_in, current = _read_keys_and_current(bundle, slot_name, prompts, positions, fc2,
                                                          reference, batch_size)
                keys = _mean_by_owner(keys_in, owner, len(targets)).T
                residual = _mean_by_owner(z - current, owner, len(targets)).T / (len(ordered) - i)
                delta = closed_form_update(keys, residual, second_moments[name], config.lam,
                                           config.alpha).float()
                originals.setdefault(name, fc2.weight.detach().clone())
                fc2.weight.add_(delta.to(fc2.weight))
                deltas[name] = delta
    finally:
        for name, weight in originals.items():
            bundle.module(name).weight.copy_(weight)
    return deltas
