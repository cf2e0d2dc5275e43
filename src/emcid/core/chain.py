"""The chain of patches a model carries, in one place: its state, its folder record, its revert.

A bundle's :class:`PatchChain` holds the patches applied in this session (with the weights
they replaced) and the chain recorded in the folder it was loaded from. A folder written by
``emcid apply`` (:func:`emcid.patch.save_pipeline`) records its chain in ``emcid_history/``:
each patch's checksum and the weights it replaced, so a model edited in several steps can be
taken back one step at a time with :func:`revert_last`. :func:`base_weights` puts the base
model's weights back for a while, so a sequential edit (one made on a model that already
carries patches) computes its statistics on the base.

Patches appear here only by what they hold (``checksum``, ``deltas``, ``metadata``), so this
module needs nothing from :mod:`emcid.patch`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ModelLoadError, PatchFileError, PatchMismatchError
from .cache import TensorCache, cache_root, read_checked, read_tensor_names, save_tensors_atomic
from .weights import load_weights, restored

if TYPE_CHECKING:
    from .bundle import ModelBundle

log = logging.getLogger(__name__)

HISTORY_DIR = "emcid_history"  # a patched pipeline folder's patch chain (written by apply)
HISTORY_FILE = "chain.json"
STAGE1_DIR = "stage1"  # the cache namespace of Stage I's targets, and its copy in the history


@dataclass
class PatchChain:
    """The patches a model carries: applied in this session, and recorded in its folder."""

    # Per module a patch of this session touched, its weight before the first of them.
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: list = field(default_factory=list)  # (patch, scale), oldest first
    # Patches recorded in the folder this model was loaded from (oldest first), each with the
    # path of the weights it replaced, and the fingerprint the folder had when written.
    history: list[dict] = field(default_factory=list)
    recorded_fingerprint: str | None = None
    at_base: bool = False  # inside base_weights: a nested call has nothing to swap

    @classmethod
    def read(cls, folder: Path) -> PatchChain:
        """The chain a folder written by ``emcid apply`` carries (none for a plain model)."""
        path = folder / HISTORY_DIR / HISTORY_FILE
        if not path.exists():
            return cls()
        try:
            chain = json.loads(path.read_text())
            steps = [{**step, "originals": str(path.parent / step["originals"])}
                     for step in chain["steps"]]
            return cls(history=steps, recorded_fingerprint=chain["model_fingerprint"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path} is corrupted ({exc!r}); delete {path.parent} to use the "
                                 "model without its patch chain") from None

    def checksums(self) -> list[str]:
        """Checksums of the patches carried, oldest first: recorded, then applied in this session."""
        return [step["sha256"] for step in self.history] + [p.checksum for p, _ in self.applied]

    def step_originals(self) -> list[dict[str, torch.Tensor]]:
        """The weights each in-memory applied patch replaced, replayed from the originals.

        ``apply`` adds deltas deterministically, so replaying it reproduces every intermediate
        state bit for bit.
        """
        current = {name: weight.clone() for name, weight in self.originals.items()}
        steps = []
        for patch, scale in self.applied:
            steps.append({name: current[name].clone() for name in patch.deltas})
            for name, delta in patch.deltas.items():
                dense = delta.dense()
                current[name].add_((dense if scale == 1.0 else scale * dense).to(current[name]))
        return steps


def chain_checksums(bundle: ModelBundle) -> list[str]:
    """Checksums of the patches the model carries, oldest first: recorded in its folder, then
    applied in this session."""
    return bundle.chain.checksums()


def _short(checksums: list[str]) -> str:
    return f"{len(checksums)} patch(es) ({', '.join(c[:12] for c in checksums) or 'none'})"


def chain_problem(bundle: ModelBundle, metadata: dict, current: str) -> str | None:
    """Why the model is not the patch chain a patch (by its ``metadata``) was made on (None if
    it is, or if the patch records no chain)."""
    made_on = metadata.get("chain")
    if not made_on:
        return None
    carried, wanted = chain_checksums(bundle), made_on.get("patches", [])
    if carried == wanted or (not carried and current == metadata.get("base_fingerprint")):
        return None  # the same chain, or its weights saved without their history
    origin = (f"this patch was made on model {made_on.get('base_fingerprint')} carrying "
              f"{_short(wanted)}")
    if not carried and current == made_on.get("base_fingerprint"):
        return f"{origin}; this is that model without them: apply them first, in that order"
    return f"{origin}; this model is {current} carrying {_short(carried)}"


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
    for number, step in enumerate(bundle.chain.history, 1):
        for name, weight in _read_step(step, number).items():
            base.setdefault(name, weight)
    return base


def _check_recorded(bundle: ModelBundle) -> None:
    if bundle.fingerprint() != bundle.chain.recorded_fingerprint:
        raise PatchMismatchError(f"the weights of {bundle.source} changed after emcid wrote it: "
                                 "its patch chain no longer describes them")


@contextmanager
def base_weights(bundle: ModelBundle) -> Iterator[ModelBundle]:
    """Inside the block, every module a patch touched holds its base model's weight.

    The base is the model before the patches applied in this session and the chain recorded
    in its folder (``emcid_history/``). A sequential edit computes its preservation
    statistics here, so every batch is solved against the same record of which key directions
    the base model's other concepts use (not one that counts earlier edits' keys as in use),
    cached once under the base model's fingerprint. The edited weights are put back, bit for
    bit, on leaving. Inside the block, a nested call changes nothing.
    """
    if bundle.chain.at_base:
        yield bundle
        return
    chain = _chain_base(bundle) if bundle.chain.history else {}
    with restored(bundle, set(bundle.chain.originals) | set(chain)):
        load_weights(bundle, bundle.chain.originals)
        if chain:
            _check_recorded(bundle)
        load_weights(bundle, chain)
        bundle.chain.at_base = True
        try:
            yield bundle
        finally:
            bundle.chain.at_base = False


def base_fingerprint(bundle: ModelBundle) -> str:
    """The fingerprint of the model without the patches it carries."""
    if not chain_checksums(bundle):
        return bundle.fingerprint()
    with base_weights(bundle):
        return bundle.fingerprint()


def chain_record(bundle: ModelBundle) -> dict:
    """Patch metadata naming the chain an edit was made on (nothing for an unpatched model)."""
    checksums = chain_checksums(bundle)
    if not checksums:
        return {}
    return {"chain": {"base_fingerprint": base_fingerprint(bundle), "patches": checksums}}


def _keep_stage1(keys: list[str], found_in: Path, history: Path) -> list[str]:
    """Copy the Stage I cache entries of ``keys`` that ``found_in`` holds into
    ``history/stage1``; the keys kept (replaying the chain elsewhere reads them, not Stage I)."""
    kept = []
    for key in keys:
        entry = found_in / f"{key}.safetensors"
        if entry.is_file():
            (history / STAGE1_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry, history / STAGE1_DIR / entry.name)
            kept.append(key)
    return kept


def write_history(bundle: ModelBundle, folder: Path) -> None:
    """``folder/emcid_history``: the chain (oldest first), the weights each step replaced and
    the Stage I targets its patches recorded, where the default cache still holds them."""
    history = folder / HISTORY_DIR
    steps = []
    for step in bundle.chain.history:
        name = f"step-{len(steps) + 1:03d}.safetensors"
        history.mkdir(exist_ok=True)
        shutil.copyfile(step["originals"], history / name)
        kept = _keep_stage1(step.get("stage1_keys", []), Path(step["originals"]).parent / STAGE1_DIR, history)
        steps.append({**step, "originals": name, "stage1_keys": kept})
    cached = cache_root() / STAGE1_DIR
    for (patch, scale), replaced in zip(bundle.chain.applied, bundle.chain.step_originals(), strict=True):
        name = f"step-{len(steps) + 1:03d}.safetensors"
        save_tensors_atomic(history / name, replaced)
        steps.append({"sha256": patch.checksum, "method": patch.metadata.get("method"),
                      "task": patch.metadata.get("task"), "sources": patch.sources,
                      "scale": scale, "originals": name,
                      "requests": patch.metadata.get("requests", []),
                      "erase_destination": patch.metadata.get("erase_destination"),
                      "stage1_keys": _keep_stage1(patch.metadata.get("stage1_keys", []), cached, history)})
    if steps:
        chain = {"model_fingerprint": bundle.fingerprint(), "steps": steps}
        (history / HISTORY_FILE).write_text(json.dumps(chain, indent=2))


def edited_requests(bundle: ModelBundle) -> list[dict]:
    """The requests (as stored in patch metadata) of every patch the model carries, oldest
    first: what a null-space Stage II keeps untouched in a sequential edit. Steps recorded
    before requests were kept in the chain contribute none."""
    return [r for step in chain_steps(bundle) for r in step["requests"] or []]


def chain_steps(bundle: ModelBundle) -> list[dict]:
    """Every patch the model carries, oldest first: its ``method``, ``task``, ``scale``,
    ``requests`` and ``erase_destination`` (what its erases became; each None where the record
    has none)."""
    keys = ("method", "task", "requests", "erase_destination")
    steps = [{**{k: step.get(k) for k in keys}, "scale": step.get("scale", 1.0)}
             for step in bundle.chain.history]
    return steps + [{**{k: patch.metadata.get(k) for k in keys}, "scale": scale}
                    for patch, scale in bundle.chain.applied]


def chain_modules(bundle: ModelBundle) -> set[str]:
    """The modules the patches the model carries changed (a recorded step's from its file's
    header: its weights are read, and checked, only when they are put back)."""
    names = set(bundle.chain.originals)
    for number, step in enumerate(bundle.chain.history, 1):
        try:
            names.update(read_tensor_names(Path(step["originals"])))
        except Exception as exc:  # safetensors raises several types for truncated/garbled files
            raise PatchFileError(f"{step['originals']} (the weights step {number} replaced): "
                                 f"{' '.join(str(exc).split())}") from None
    return names


def adopt_stage1(bundle: ModelBundle, cache: TensorCache) -> int:
    """Copy the Stage I targets a recorded chain kept into ``cache`` where it lacks them (each
    read checked first; a missing or damaged one is left to Stage I); how many it copied."""
    adopted = 0
    for step in bundle.chain.history:
        kept = Path(step["originals"]).parent / STAGE1_DIR
        for key in step.get("stage1_keys", []):
            if cache.path(key).exists():
                continue
            try:
                cache.save(key, *read_checked(kept / f"{key}.safetensors"))
            except (OSError, ValueError) as exc:
                log.warning("%s: %s; Stage I computes it again", kept / f"{key}.safetensors", exc)
                continue
            adopted += 1
    return adopted


def _describe(step: dict, number: int, total: int) -> str:
    return f"step {number} of {total} ({step.get('method')}: {', '.join(step.get('sources', []))})"


@torch.no_grad()
def revert_last(bundle: ModelBundle, patch=None) -> dict:
    """Take the last patch of the model's recorded chain off, restoring its weights exactly.

    ``patch``, if given, must be that last patch: chains are reverted last first. Patches
    applied in this session are reverted with :meth:`EditPatch.revert` instead.
    """
    chain = bundle.chain
    if chain.applied:
        raise PatchMismatchError("patches were applied in this session: revert them with "
                                 "EditPatch.revert before the recorded chain")
    total = len(chain.history)
    if not total:
        raise PatchMismatchError(f"{bundle.source} carries no recorded patch "
                                 f"({HISTORY_DIR}/{HISTORY_FILE}): nothing to revert")
    last = chain.history[-1]
    if patch is not None and patch.checksum != last["sha256"]:
        numbers = [i for i, step in enumerate(chain.history, 1) if step["sha256"] == patch.checksum]
        if not numbers:
            raise PatchMismatchError(f"this patch is not among the {total} patches that "
                                     f"{bundle.source} carries")
        raise PatchMismatchError(
            f"this patch is {_describe(chain.history[numbers[0] - 1], numbers[0], total)} of "
            f"{bundle.source}; patches are reverted last first: revert "
            f"{_describe(last, total, total)} first")
    _check_recorded(bundle)
    load_weights(bundle, _read_step(last, total))
    chain.history.pop()
    chain.recorded_fingerprint = bundle.fingerprint()
    return last
