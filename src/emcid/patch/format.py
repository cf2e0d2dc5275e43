"""EditPatch: the result of an edit, as weight deltas that apply to and revert from a model.

One delta per edited module, stored as two low-rank factors (``up @ down``) when its rank is
under half the width, else as the full matrix; JSON metadata records the base model's
fingerprint, the requests, hyperparameters and package version. Saved as one safetensors
file whose checksum covers the tensors and the metadata, checked on load (as cache entries
are). ``apply`` keeps the original weights so ``revert`` restores them bit for bit; the
chain of patches a model carries is :mod:`emcid.core.chain`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.bundle import ModelBundle
from ..core.cache import read_metadata, save_tensors_atomic, tensors_checksum
from ..core.chain import chain_problem
from ..core.weights import add_weights, current_weights, load_weights
from ..errors import PatchFileError, PatchMismatchError

log = logging.getLogger(__name__)

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, torch.save's zip container
PARTS = ("delta", "up", "down")  # tensor name suffixes of a patch file
RANK_RTOL = 1e-6  # singular values below this fraction of the largest count as zero


def svd_rank(delta: torch.Tensor, rtol: float = RANK_RTOL,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """SVD in float64 and the numerical rank (singular values above ``rtol`` of the largest)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    top = float(s.max()) if s.numel() else 0.0
    return u, s, vh, int((s > rtol * top).sum()) if top > 0 else 0


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
    def compress(cls, delta: torch.Tensor, rtol: float = RANK_RTOL) -> DeltaWeight:
        """Factor by SVD when the numerical rank is under half the smaller side."""
        u, s, vh, rank = svd_rank(delta, rtol)
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

    @property
    def sources(self) -> list[str]:
        """The edited source concepts, one per recorded request (a merged patch's too)."""
        return [r.get("source") for r in self.metadata.get("requests", [])]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored: ``<module>.delta``, or ``<module>.up`` and ``<module>.down``."""
        tensors = {}
        for name, delta in self.deltas.items():
            if delta.down is None:
                tensors[f"{name}.delta"] = delta.up
            else:
                tensors[f"{name}.up"] = delta.up
                tensors[f"{name}.down"] = delta.down
        return tensors

    @property
    def checksum(self) -> str:
        """SHA-256 of the tensors and the metadata; names the patch in a model's patch chain."""
        return tensors_checksum(self.tensors(), json.dumps(self.metadata))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        text = json.dumps(self.metadata)
        save_tensors_atomic(path, self.tensors(), {"emcid": text}, extra=text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditPatch:
        """Read a patch file; anything but an intact emcid patch is a :class:`PatchFileError`."""
        path = Path(path)
        tensors, text = _read_patch_file(path)
        try:
            metadata = json.loads(text)
        except json.JSONDecodeError:
            raise PatchFileError(f"{path}: its emcid metadata is not JSON (corrupted?)") from None
        return cls(_deltas(path, tensors), metadata)

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
        carried = bundle.chain.checksums()
        if self.checksum in carried:
            step = carried.index(self.checksum) + 1
            problem = f"this patch is already applied to this model (step {step} of its chain)"
        else:
            current = bundle.fingerprint()
            problem = chain_problem(bundle, self.metadata, current)
            if problem is None and self.base_fingerprint != current:
                problem = (f"this patch was made for model {self.base_fingerprint}, but the model "
                           f"is {current} (a different checkpoint, or one already patched)")
        if problem is None:
            return
        if force:
            log.warning("%s; applying it anyway (--force)", problem)
            return
        raise PatchMismatchError(f"{problem}; pass force=True (--force) to apply it anyway")

    @torch.no_grad()
    def apply(self, bundle: ModelBundle, force: bool = False, scale: float = 1.0) -> None:
        """Add the deltas to the model's weights (refused on another base model unless forced)."""
        self._check(bundle, force)
        chain = bundle.chain
        chain.originals.update(current_weights(bundle, [n for n in self.deltas if n not in chain.originals]))
        add_weights(bundle, {name: delta.dense() for name, delta in self.deltas.items()}, scale)
        chain.applied.append((self, scale))

    @contextmanager
    def applied(self, bundle: ModelBundle, force: bool = False) -> Iterator[None]:
        """The patch applied for the ``with`` block and reverted after it, even on an error (how
        a benchmark draws the edited model's images and gives back the unedited one)."""
        self.apply(bundle, force=force)
        try:
            yield
        finally:
            self.revert(bundle)

    @torch.no_grad()
    def revert(self, bundle: ModelBundle) -> None:
        """Remove this patch: originals are restored bit for bit, other patches re-applied."""
        chain = bundle.chain
        remaining = [(p, s) for p, s in chain.applied if p is not self]
        if len(remaining) == len(chain.applied):
            raise PatchMismatchError("this patch is not applied to the model")
        load_weights(bundle, chain.originals)
        chain.originals.clear()
        chain.applied.clear()
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


def _read_patch_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors and metadata text of a patch file, after checking what the file is."""
    if not path.is_file():
        raise PatchFileError(f"patch file {path} does not exist" if not path.exists()
                             else f"{path} is a folder, not a patch file")
    with path.open("rb") as handle:
        head = handle.read(9)  # safetensors: an 8-byte header length, then the JSON header
    if not head:
        raise PatchFileError(f"patch file {path} is empty (0 bytes)")
    if head.startswith(PICKLE_MAGIC) and head[8:9] != b"{":
        raise PatchFileError(f"{path} is a pickle (torch.save) file, which can run code when "
                             "loaded; patches are safetensors files written by `emcid edit`")
    try:
        tensors = load_file(str(path))
        metadata = read_metadata(path)
    except Exception as exc:  # safetensors raises several types for truncated/garbled files
        raise PatchFileError(f"{path} is not a readable safetensors file (truncated or "
                             f"corrupted?): {' '.join(str(exc).split())}") from None
    if "emcid" not in metadata:
        raise PatchFileError(f"{path} is a safetensors file but not an emcid patch (no emcid "
                             f"metadata; {len(tensors)} tensors, model weights?)")
    if metadata.get("sha256") != tensors_checksum(tensors, metadata["emcid"]):
        raise PatchFileError(f"{path} fails its checksum: the file is corrupted (or was written "
                             "by an emcid without patch checksums); recompute or re-copy it")
    return tensors, metadata["emcid"]


def _deltas(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, DeltaWeight]:
    """Pair ``.up``/``.down`` factors; refuse names, shapes or values no patch holds."""
    names = {}
    for key in tensors:
        name, _, part = key.rpartition(".")
        if part not in PARTS or not name:
            raise PatchFileError(f"{path}: tensor {key!r} is not an emcid weight delta")
        names.setdefault(name, set()).add(part)
    deltas = {}
    for name, parts in names.items():
        if parts not in ({"delta"}, {"up", "down"}):
            raise PatchFileError(f"{path}: module {name} has parts {sorted(parts)}")
        if parts == {"delta"}:
            delta = DeltaWeight(tensors[f"{name}.delta"])
        else:
            delta = DeltaWeight(tensors[f"{name}.up"], tensors[f"{name}.down"])
        matrices = [delta.up] + ([delta.down] if delta.down is not None else [])
        if any(m.ndim != 2 for m in matrices) or (
                delta.down is not None and delta.up.shape[1] != delta.down.shape[0]):
            raise PatchFileError(f"{path}: the delta of {name} has inconsistent shapes")
        if not all(torch.isfinite(m).all() for m in matrices):
            raise PatchFileError(f"{path}: the delta of {name} holds NaN or inf")
        deltas[name] = delta
    if not deltas:
        raise PatchFileError(f"{path} holds no weight deltas")
    return deltas
