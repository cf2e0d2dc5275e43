"""EditPatch: the result of an edit, as weight deltas that apply to and revert from a model.

One delta per edited module, stored as two low-rank factors (``up @ down``) when its rank is
under half the width, else as the full matrix; JSON metadata records the base model's
fingerprint, the requests, hyperparameters and package version. Saved as one safetensors
file whose checksum covers the tensors and the metadata, checked on load (as cache entries
are). ``apply`` keeps the original weights so ``revert`` restores them bit for bit.

:func:`save_pipeline` writes a patched model as a diffusers folder together with its patch
chain (``emcid_history/``: each patch's checksum and the weights it replaced), so a model
edited in several steps can be taken back one step at a time with :func:`revert_last`.
:func:`base_weights` puts the base model's weights back for a while, so a sequential edit
(one made on a model that already carries patches) computes its statistics on the base.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .cache import read_checked, read_metadata, save_tensors_atomic, tensors_checksum
from .errors import PatchFileError, PatchMismatchError
from .models import HISTORY_DIR, HISTORY_FILE, ModelBundle, write_settings

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, torch.save's zip container
PARTS = ("delta", "up", "down")  # tensor name suffixes of a patch file


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
        if force:
            return
        current = bundle.fingerprint()
        problem = self._chain_problem(bundle, current)
        if problem is None and self.base_fingerprint != current:
            problem = (f"this patch was made for model {self.base_fingerprint}, but the model is "
                       f"{current} (a different checkpoint, or one already patched)")
        if problem is not None:
            raise PatchMismatchError(f"{problem}; pass force=True (--force) to apply it anyway")

    def _chain_problem(self, bundle: ModelBundle, current: str) -> str | None:
        """Why the model is not the patch chain this patch was made on (None if it is, or if
        the patch records no chain)."""
        made_on = self.metadata.get("chain")
        if not made_on:
            return None
        carried, wanted = chain_checksums(bundle), made_on.get("patches", [])
        if carried == wanted or (not carried and current == self.base_fingerprint):
            return None  # the same chain, or its weights saved without their history
        origin = (f"this patch was made on model {made_on.get('base_fingerprint')} carrying "
                  f"{_short(wanted)}")
        if not carried and current == made_on.get("base_fingerprint"):
            return f"{origin}; this is that model without them: apply them first, in that order"
        return f"{origin}; this model is {current} carrying {_short(carried)}"

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


def _step_originals(bundle: ModelBundle) -> list[dict[str, torch.Tensor]]:
    """The weights each in-memory applied patch replaced, replayed from the originals.

    ``apply`` adds deltas deterministically, so replaying it reproduces every intermediate
    state bit for bit.
    """
    current = {name: weight.clone() for name, weight in bundle.originals.items()}
    steps = []
    for patch, scale in bundle.applied:
        steps.append({name: current[name].clone() for name in patch.deltas})
        for name, delta in patch.deltas.items():
            current[name].add_((scale * delta.dense()).to(current[name]))
    return steps


def chain_checksums(bundle: ModelBundle) -> list[str]:
    """Checksums of the patches the model carries, oldest first: recorded in its folder, then
    applied in this session."""
    return [step["sha256"] for step in bundle.history] + [p.checksum for p, _ in bundle.applied]


def _short(checksums: list[str]) -> str:
    return f"{len(checksums)} patch(es) ({', '.join(c[:12] for c in checksums) or 'none'})"


def _read_step(step: dict, number: int) -> dict[str, torch.Tensor]:
    """The weights step ``number`` of a recorded chain replaced."""
    try:
        return read_checked(Path(step["originals"]))[0]
    except (OSError, ValueError) as exc:
        raise PatchFileError(f"{step['originals']} (the weights step {number} replaced): "
                             f"{exc}") from None


def _chain_base(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """Per module the recorded chain touched, its weight before the first step touching it."""
    base: dict[str, torch.Tensor] = {}
    for number, step in enumerate(bundle.history, 1):
        for name, weight in _read_step(step, number).items():
            base.setdefault(name, weight)
    return base


@torch.no_grad()
def _load_weights(bundle: ModelBundle, weights: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        target = bundle.module(name).weight
        target.copy_(weight.to(target))


@contextmanager
def base_weights(bundle: ModelBundle) -> Iterator[ModelBundle]:
    """Inside the block, every module a patch touched holds its base model's weight.

    The base is the model before the patches applied in this session and the chain recorded
    in its folder (``emcid_history/``). A sequential edit computes its preservation
    statistics here, so every batch is solved against the same record of which key directions
    the base model's other concepts use (not one that counts earlier edits' keys as in use),
    cached once under the base model's fingerprint. The edited weights are put back, bit for
    bit, on leaving.
    """
    chain = _chain_base(bundle) if bundle.history else {}
    touched = set(bundle.originals) | set(chain)
    current = {name: bundle.module(name).weight.detach().clone() for name in touched}
    try:
        _load_weights(bundle, bundle.originals)
        if chain and bundle.fingerprint() != bundle.recorded_fingerprint:
            raise PatchMismatchError(f"the weights of {bundle.source} changed after emcid wrote "
                                     "it: its patch chain no longer describes them")
        _load_weights(bundle, chain)
        yield bundle
    finally:
        _load_weights(bundle, current)


def chain_record(bundle: ModelBundle) -> dict:
    """Patch metadata naming the chain an edit was made on (nothing for an unpatched model)."""
    checksums = chain_checksums(bundle)
    if not checksums:
        return {}
    with base_weights(bundle):
        base = bundle.fingerprint()
    return {"chain": {"base_fingerprint": base, "patches": checksums}}


def _write_history(bundle: ModelBundle, folder: Path) -> None:
    """``folder/emcid_history``: the chain (oldest first) and the weights each step replaced."""
    history = folder / HISTORY_DIR
    steps = []
    for step in bundle.history:
        name = f"step-{len(steps) + 1:03d}.safetensors"
        history.mkdir(exist_ok=True)
        shutil.copyfile(step["originals"], history / name)
        steps.append({**step, "originals": name})
    for (patch, scale), replaced in zip(bundle.applied, _step_originals(bundle), strict=True):
        name = f"step-{len(steps) + 1:03d}.safetensors"
        save_tensors_atomic(history / name, replaced)
        sources = [r.get("source") for r in patch.metadata.get("requests", [])]
        steps.append({"sha256": patch.checksum, "method": patch.metadata.get("method"),
                      "sources": sources, "scale": scale, "originals": name})
    if steps:
        chain = {"model_fingerprint": bundle.fingerprint(), "steps": steps}
        (history / HISTORY_FILE).write_text(json.dumps(chain, indent=2))


def _refuse_overlap(bundle: ModelBundle, folder: Path) -> None:
    source = Path(bundle.source)
    if not source.exists():
        return  # a hub id
    source, target = source.resolve(), folder.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise PatchFileError(f"--out {folder} would overwrite the model {bundle.source}: write "
                             "the edited pipeline to a new folder beside it")
    if target.exists() and any(target.iterdir()) and not (target / "model_index.json").exists():
        raise PatchFileError(f"--out {folder} exists and is not a pipeline folder: choose a new "
                             "folder")


def save_pipeline(bundle: ModelBundle, folder: str | os.PathLike) -> Path:
    """Save the (patched) pipeline with ``save_pretrained``, emcid's settings and patch chain.

    Refuses to write over (or into) the folder the model came from. The folder is written
    beside its final place and renamed into it, so an interrupted save leaves no half model.
    The chain records every patch the model carries, so :func:`revert_last` can take them off
    one at a time, last first, bit for bit.
    """
    folder = Path(folder)
    _refuse_overlap(bundle, folder)
    tmp = folder.parent / f".{folder.name}.emcid-tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.emcid-old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bundle.pipeline.save_pretrained(tmp, safe_serialization=True)
        write_settings(bundle, tmp)
        _write_history(bundle, tmp)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _describe(step: dict, number: int, total: int) -> str:
    return f"step {number} of {total} ({step.get('method')}: {', '.join(step.get('sources', []))})"


@torch.no_grad()
def revert_last(bundle: ModelBundle, patch: EditPatch | None = None) -> dict:
    """Take the last patch of the model's recorded chain off, restoring its weights exactly.

    ``patch``, if given, must be that last patch: chains are reverted last first. Patches
    applied in this session are reverted with :meth:`EditPatch.revert` instead.
    """
    if bundle.applied:
        raise PatchMismatchError("patches were applied in this session: revert them with "
                                 "EditPatch.revert before the recorded chain")
    total = len(bundle.history)
    if not total:
        raise PatchMismatchError(f"{bundle.source} carries no recorded patch "
                                 f"({HISTORY_DIR}/{HISTORY_FILE}): nothing to revert")
    last = bundle.history[-1]
    if patch is not None and patch.checksum != last["sha256"]:
        numbers = [i for i, step in enumerate(bundle.history, 1) if step["sha256"] == patch.checksum]
        if not numbers:
            raise PatchMismatchError(f"this patch is not among the {total} patches that "
                                     f"{bundle.source} carries")
        raise PatchMismatchError(
            f"this patch is {_describe(bundle.history[numbers[0] - 1], numbers[0], total)} of "
            f"{bundle.source}; patches are reverted last first: revert "
            f"{_describe(last, total, total)} first")
    if bundle.fingerprint() != bundle.recorded_fingerprint:
        raise PatchMismatchError(f"the weights of {bundle.source} changed after emcid wrote it: "
                                 "its patch chain no longer describes them")
    _load_weights(bundle, _read_step(last, total))
    bundle.history.pop()
    bundle.recorded_fingerprint = bundle.fingerprint()
    return last
