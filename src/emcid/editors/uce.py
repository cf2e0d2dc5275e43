"""UCE (Gandikota et al., 2024): TIME's closed form with concepts to preserve, in two variants.

- ``v2025`` (the default; every UCE figure in the docs used it): after UCE's 2025 code, keyed
  on the subject token (here in each of the request's prompts), targets ``v* = W c_dst``,
  erase and preserve scales 1, only the ``preserve`` concepts preserved (at their subject
  token); lam 0.1, where that code's script defaults to 0.5.
- ``paper``: UCE as the EMCID paper ran it, the EMCID release's copy of UCE's 2023 code
  (``edit_model_uce``, ``technique="tensor"``, its defaults lam 0.1, erase scale 0.1,
  preserve scale 0.1). It edits at the bare concept names (``request.source`` and
  ``request.destination``, not the prompt templates); the keys of one edit are the source's
  last subject token, its end-of-text token and the padding after them, row for row against
  the destination's from its own last token, both cut to the same count (the token window,
  77 on SD, less the larger last-token index); an erase's destination ("") starts at its
  start-of-text token. The target of each row is the "tensor" one: ``W c_dst`` less its
  component along the edit's source outputs ``W c_src``, taken over all the edit's rows as
  one vector. The preserved prompts are ``preserve``, or the empty prompt "" when none is
  given (as the release's function does), every token of their window, each kept at ``W c``.

Both solve ``W' = (lam W + e sum V^T K + p sum W P^T P)(lam I + e sum K^T K + p sum P^T P)^{-1}``
per projection (:func:`~emcid.editors.crossattn.closed_form_update`, float64).

``projection="nullspace"`` (after SPEED, ICLR 2026, and AlphaEdit, ICLR 2025) constrains the
update instead of only penalising it: ``W' - W = G U^T`` with ``U`` the eigenvectors of the
preserved rows' ``P^T P`` whose eigenvalue is below ``nullspace_threshold`` times its largest,
so every key in the span of the others keeps its output exactly; ``G`` minimises the same
objective in those coordinates (:func:`projected_closed_form`; docs/method.md, section 5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..core.bundle import ModelBundle
from ..core.config import check_choice, check_float
from ..errors import OptionError
from ..requests.edit import EditRequest
from .crossattn import (
    CrossAttentionConfig,
    CrossAttentionEditor,
    cross_attention_projections,
)
from .emcid.nullspace import eigen_decomposition, free_space, projected_update

# variant: (erase_scale, preserve_scale) where the caller gives none
VARIANT_SCALES = {"v2025": (1.0, 1.0), "paper": (0.1, 0.1)}


@dataclass
class UCEConfig(CrossAttentionConfig):
    preserve_scale: float | None = None  # None: the variant's (v2025: 1, paper: 0.1)
    variant: str = "v2025"
    erase_scale: float | None = None  # weight of the edits' sums; None: the variant's (1, 0.1)
    # none: UCE's closed form; nullspace: the update confined to the directions where the
    # preserved rows' P^T P has eigenvalues below nullspace_threshold x its largest
    projection: str = "none"
    nullspace_threshold: float = 1e-2

    def __post_init__(self) -> None:
        check_choice("uce", "variant", self.variant, tuple(VARIANT_SCALES))
        erase, preserve = VARIANT_SCALES[self.variant]
        self.erase_scale = erase if self.erase_scale is None else self.erase_scale
        self.preserve_scale = preserve if self.preserve_scale is None else self.preserve_scale
        super().__post_init__()
        check_float("uce", "erase_scale", self.erase_scale, low=0, low_open=True)
        check_choice("uce", "projection", self.projection, ("none", "nullspace"))
        check_float("uce", "nullspace_threshold", self.nullspace_threshold, low=0, high=1,
                    low_open=True, high_open=True)
        if self.projection == "nullspace" and self.variant == "v2025" and not self.preserve:
            # v2025 preserves nothing else: P^T P = 0 has no eigenvalue below the threshold.
            raise OptionError("uce option projection=nullspace: variant v2025 preserves only the "
                              "preserve concepts; give some (preserve=[...])")


@torch.no_grad()
def prompt_states(bundle: ModelBundle, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Every token's UNet conditioning, (n, window, width) float64, and each prompt's last
    token before end-of-text (0, the start-of-text token, for an empty prompt)."""
    tokenizer = bundle.slots()[0].tokenizer
    limit = tokenizer.model_max_length
    last = [len(tokenizer(p, truncation=True, max_length=limit).input_ids) - 2 for p in prompts]
    return bundle.encode(prompts).embeds.double().cpu(), last


def paper_keys(bundle: ModelBundle, requests: list[EditRequest]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source rows, destination rows, the edit each row belongs to) of the paper variant."""
    sources, src_last = prompt_states(bundle, [r.source for r in requests])
    dests, dst_last = prompt_states(bundle, [r.destination for r in requests])
    length = sources.shape[1]
    src_rows, dst_rows, owner = [], [], []
    for edit, (s, d) in enumerate(zip(src_last, dst_last)):
        count = length - max(s, d)
        src_rows.append(sources[edit, s:s + count])
        dst_rows.append(dests[edit, d:d + count])
        owner += [edit] * count
    return torch.cat(src_rows), torch.cat(dst_rows), torch.tensor(owner)


def tensor_targets(source_out: torch.Tensor, dest_out: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The release's "tensor" targets: each edit's destination outputs less their projection
    on the unit direction of its source outputs (all the edit's rows as one vector)."""
    count = int(owner.max()) + 1

    def per_edit(rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(count, dtype=rows.dtype).index_add_(0, owner, rows)

    unit = source_out / per_edit(source_out.pow(2).sum(1)).sqrt()[owner, None]
    along = per_edit((unit * dest_out).sum(1))
    return dest_out - along[owner, None] * unit


def projected_closed_form(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          basis: torch.Tensor, spectrum: torch.Tensor, lam: float, edit_scale: float,
                          preserve_scale: float) -> torch.Tensor:
    """``W' - W = G U^T`` minimising UCE's objective within the free space ``U`` (d, f), with
    ``spectrum = U^T P^T P U``. In ``D = W' - W`` that objective is
    ``e ||D K^T - R||^2 + tr(D (lam I + p P^T P) D^T)``, ``R = V^T - W K^T``: Stage II's with
    ``C = lam I + p P^T P``, its lam 1 and ``a = e / (1 + e)``, so Stage II's projected solve
    (float64, one Cholesky) gives ``G = e R K U (lam I + e U^T K^T K U + p U^T P^T P U)^{-1}``."""
    reduced = lam * torch.eye(basis.shape[1], dtype=torch.float64) + preserve_scale * spectrum
    residuals = values.T - weight @ keys.T
    return projected_update(keys.T, residuals, basis, reduced, 1.0, edit_scale / (1 + edit_scale))


class UCEEditor(CrossAttentionEditor):
    name = "uce"
    config_class = UCEConfig
    uses_preservation = True

    def edit_scale(self) -> float:
        return self.config.erase_scale

    def solver(self, preserved: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                          torch.Tensor]:
        """With ``projection="nullspace"``, the closed form within the preserved rows' free
        space (refused when the threshold leaves none: the patch would change nothing)."""
        config = self.config
        if config.projection == "none":
            return super().solver(preserved)
        values, vectors = eigen_decomposition(preserved.T @ preserved, None)
        basis, spectrum = free_space("uce's preserved keys", values, vectors, config.nullspace_threshold)
        return partial(projected_closed_form, basis=basis, spectrum=spectrum, lam=config.lam,
                       edit_scale=config.erase_scale, preserve_scale=config.preserve_scale)

    def compute(self, bundle: ModelBundle, requests: list[EditRequest], progress: bool) -> dict:
        if self.config.variant == "paper":
            return self.paper_deltas(bundle, requests)
        return super().compute(bundle, requests, progress)

    def paper_deltas(self, bundle: ModelBundle, requests: list[EditRequest]) -> dict:
        sources, dests, owner = paper_keys(bundle, requests)
        kept, _ = prompt_states(bundle, list(self.config.preserve) or [""])
        kept = kept.reshape(-1, kept.shape[-1])
        solve, deltas = self.solver(kept), {}
        for name, module in cross_attention_projections(bundle, self.config.edit_keys).items():
            weight = module.weight.detach().double().cpu()
            targets = tensor_targets(sources @ weight.T, dests @ weight.T, owner)
            deltas[name] = solve(weight, sources, targets).float()
        return deltas
