"""Stage I's result for one request: what Stage II writes (and debias mixes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...requests.edit import EditRequest


@dataclass
class ConceptTarget:
    """Stage I's result for one request, per edited text encoder (by component name)."""

    request: EditRequest
    z_layer: dict[str, int]
    deltas: dict[str, torch.Tensor]  # (width,)
    source_hidden: dict[str, torch.Tensor]  # unedited h at l*, (n_prompts, width)
    final_loss: float
    steps: int | None = None  # the Stage I steps its delta took (None: an entry cached before)
    # whether the stopping rule stopped it (False: it ran all steps without; None: the rule was
    # off, or an entry cached before this was recorded)
    converged: bool | None = None
    # its Stage I cache key (schedule.cache_key_for): a patch records them, and a chain folder
    # keeps the entries, so replaying the chain elsewhere need not compute them again
    key: str | None = None

    def targets(self, slot: str) -> torch.Tensor:
        """z = h + delta at l* for every source prompt: (n_prompts, width)."""
        return self.source_hidden[slot] + self.deltas[slot]

    def first_prompt_target(self, slot: str) -> torch.Tensor:
        """z = h + delta at the first source prompt only, (width,): the one target per
        concept that the EMCID release writes into Stage II."""
        return self.source_hidden[slot][0] + self.deltas[slot]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"delta.{k}": v for k, v in self.deltas.items()}
        tensors.update({f"hidden.{k}": v for k, v in self.source_hidden.items()})
        tensors["final_loss"] = torch.tensor(self.final_loss)
        if self.steps is not None:
            tensors["steps"] = torch.tensor(self.steps)
        if self.converged is not None:
            tensors["converged"] = torch.tensor(self.converged)
        return tensors

    @classmethod
    def from_tensors(cls, request: EditRequest, z_layer: dict[str, int],
                     tensors: dict[str, torch.Tensor]) -> ConceptTarget:
        return cls(
            request, z_layer,
            {k: tensors[f"delta.{k}"] for k in z_layer},
            {k: tensors[f"hidden.{k}"] for k in z_layer},
            float(tensors["final_loss"]),
            int(tensors["steps"]) if "steps" in tensors else None,
            bool(tensors["converged"]) if "converged" in tensors else None,
        )
