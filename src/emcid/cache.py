"""A content-addressed, atomic on-disk cache of tensors (Stage I targets, images, statistics).

Keys hash everything a result depends on, so a changed prompt, seed or hyperparameter can
never return a stale entry. Writes go to a temporary file that is renamed into place, so an
interrupted run leaves either the old entry or the new one. Every entry carries a checksum;
a corrupted file is detected on read, removed, and reported as a miss (it is recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$EMCID_CACHE``, else ``$XDG_CACHE_HOME/emcid``, else ``~/.cache/emcid``."""
    if os.environ.get("EMCID_CACHE"):
        return Path(os.environ["EMCID_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "emcid"


def content_key(**parts: object) -> str:
    """A stable hash of JSON-serialisable parts (sorted keys, so order never matters)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_tensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file with a checksum, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**(metadata or {}), "sha256": tensors_checksum(tensors)}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def load_tensors_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Read a file written by :func:`save_tensors_atomic`; None (and removed) if corrupted."""
    try:
        tensors = load_file(str(path))
        metadata = read_metadata(path)
    except Exception as exc:  # safetensors raises several types for truncated/garbled files
        log.warning("cache entry %s is unreadable (%s); recomputing", path, exc)
        path.unlink(missing_ok=True)
        return None
    if metadata.get("sha256") != tensors_checksum(tensors):
        log.warning("cache entry %s fails its checksum; recomputing", path)
        path.unlink(missing_ok=True)
        return None
    return tensors, metadata


class TensorCache:
    """One namespace of the cache: ``root/namespace/<key>.safetensors``."""

    def __init__(self, namespace: str, root: Path | None = None, enabled: bool = True):
        self.folder = (root or cache_root()) / namespace
        self.enabled = enabled

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        if not self.enabled or not self.path(key).exists():
            return None
        return load_tensors_checked(self.path(key))

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        if self.enabled:
            meta = {k: str(v) for k, v in (metadata or {}).items()}
            save_tensors_atomic(self.path(key), tensors, meta)
