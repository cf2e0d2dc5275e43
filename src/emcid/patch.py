"""EditPatch: the result of an edit, as weight deltas that apply to and revert from a model.

One delta per edited module, stored as two low-rank factors (``up @ down``) when its rank is
under half the width, else as the full matrix; JSON metadata records the base model's
fingerprint, the requests, hyperparameters and package version. Saved as one safetensors
file. ``apply`` keeps the original weights so ``revert`` restores them bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import PatchMismatchError
from .models import ModelBundle


@dataclass
class DeltaWeight:
    """``up @ down`` when factored (up: (d_out, r), down: (r, d_in)), else ``up`` itself."""

    up: torch.Tensor
    down: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        return self.up if self.down is None else self.up @ self.down

    @property
    def rank(self) -> int:
        return self.up.shape[1] if self.down is not None else min(self.up.shape)

    @classmethod
    def compress(cls, delta: torch.Tensor, rtol: float = 1e-6) -> DeltaWeight:
        """Factor by SVD when the numerical rank is under half the smaller side."""
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        rank = int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
        if rank >= min(delta.shape) / 2:
            return cls(delta.float().contiguous())
        rank = max(rank, 1)
        root = s[:rank].sqrt()
        up = (u[:, :rank] * root).float().contiguous()
        down = (root.unsqueeze(1) * vh[:rank]).float().contiguous()
        return cls(up, down)


@dataclass
class EditPatch:
    """Weight deltas keyed by module name (``text_encoder.text_model....mlp.fc2``)."""

    deltas: dict[str, DeltaWeight]
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_dense(cls, deltas: dict[str, torch.Tensor], metadata: dict) -> EditPatch:
        return cls({n: DeltaWeight.compress(d) for n, d in deltas.items()}, metadata)

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("base_fingerprint")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, delta in self.deltas.items():
            if delta.down is None:
                tensors[f"{name}.delta"] = delta.up
            else:
                tensors[f"{name}.up"] = delta.up
                tensors[f"{name}.down"] = delta.down
        save_file(tensors, str(path), metadata={"emcid": json.dumps(self.metadata)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditPatch:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"patch file {path} does not exist")
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("emcid", "{}"))
        tensors = load_file(str(path))
        deltas: dict[str, DeltaWeight] = {}
        for key in tensors:
            name, _, part = key.rpartition(".")
            if part == "delta":
                deltas[name] = DeltaWeight(tensors[key])
            elif part == "up":
                deltas[name] = DeltaWeight(tensors[key], tensors[f"{name}.down"])
        return cls(deltas, metadata)

    def _check(self, bundle: ModelBundle, force: bool) -> None:
        for name, delta in self.deltas.items():
            try:
                weight = bundle.module(name).weight
            except AttributeError as exc:
                raise PatchMismatchError(f"the model has no module {name}") from exc
            shape = (delta.up.shape[0], delta.down.shape[1] if delta.down is not None
                     else delta.up.shape[1])
            if tuple(weight.shape) != shape:
                raise PatchMismatchError(
                    f"patch delta for {name} is {shape}, the model's weight is {tuple(weight.shape)}")
        current = bundle.fingerprint()
        if not force and self.base_fingerprint != current:
            raise PatchMismatchError(
                f"this patch was made for model {self.base_fingerprint}, but the model is "
                f"{current} (a different checkpoint, or one already patched); pass force=True "
                "(--force) to apply it anyway"
            )

    @torch.no_grad()
    def apply(self, bundle: ModelBundle, force: bool = False, scale: float = 1.0) -> None:
        """Add the deltas to the model's weights (refused on another base model unless forced)."""
        self._check(bundle, force)
        for name, delta in self.deltas.items():
            weight = bundle.module(name).weight
            bundle.originals.setdefault(name, weight.detach().clone())
            weight.add_((scale * delta.dense()).to(weight))
        bundle.applied.append((self, scale))

    @torch.no_grad()
    def revert(self, bundle: ModelBundle) -> None:
        """Remove this patch: originals are restored bit for bit, other patches re-applied."""
        remaining = [(p, s) for p, s in bundle.applied if p is not self]
        if len(remaining) == len(bundle.applied):
            raise PatchMismatchError("this patch is not applied to the model")
        for name, weight in bundle.originals.items():
            bundle.module(name).weight.copy_(weight)
        bundle.originals.clear()
        bundle.applied.clear()
        for patch, scale in remaining:
            patch.apply(bundle, force=True, scale=scale)

    def merge(self, other: EditPatch) -> EditPatch:
        """One patch holding both edits' deltas (summed where both touch a module)."""
        if self.base_fingerprint != other.base_fingerprint:
            raise PatchMismatchError("cannot merge patches made for different base models")
        names = sorted(set(self.deltas) | set(other.deltas))
        dense = {}
        for name in names:
            parts = [p.deltas[name].dense() for p in (self, other) if name in p.deltas]
            dense[name] = sum(parts)
        requests = self.metadata.get("requests", []) + other.metadata.get("requests", [])
        metadata = {**self.metadata, "requests": requests, "merged": True}
        return EditPatch.from_dense(dense, metadata)
