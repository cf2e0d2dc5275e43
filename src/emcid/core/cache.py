"""A content-addressed, atomic on-disk cache of tensors (Stage I targets, images, statistics).

Keys hash everything a result depends on, so a changed prompt, seed or hyperparameter can
never return a stale entry. Writes go to a temporary file that is renamed into place, so an
interrupted run leaves either the old entry or the new one. Every entry carries a checksum;
a corrupted file is detected on read, removed, and reported as a miss (it is recomputed).
A cache folder that cannot be written is reported when a cache is opened, before any work;
an entry that cannot be removed or written later (permissions changed mid-run) is logged and
the result kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..errors import CacheError, WriteError
from .folders import give_umask_modes, remove_stale_files, temp_file_prefix

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


def tensors_checksum(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 of names, shapes, dtypes and bytes, plus ``extra`` text (patches: their metadata)."""
    digest = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _symlink_problem(folder: Path) -> str | None:
    """A symlink on the way to ``folder`` that loops or points nowhere."""
    for path in [*reversed(folder.parents), folder]:
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except RuntimeError:
                return f"{path} is a symlink loop"
            except OSError:
                return f"{path} is a symlink to {os.readlink(path)}, which does not exist"
            if not target.is_dir():
                return f"{path} is a symlink to {target}, which is not a folder"
    return None


def check_writable(folder: Path) -> None:
    """Raise :class:`CacheError` unless ``folder`` is, or can be made, a writable folder.

    The folder is made here and a probe file written in it, so a file on the way, a symlink
    that loops or points nowhere, missing permissions or a read-only mount are reported at
    once, not when the first entry is written after the work.
    """
    fix = "point EMCID_CACHE at a writable folder (or pass --no-cache)"
    problem = _symlink_problem(folder)
    if problem:
        raise CacheError(f"cache folder {folder}: {problem}; {fix}")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CacheError(f"cache folder {folder}: {existing} is a file, not a folder; point "
                         "EMCID_CACHE at a folder (or pass --no-cache)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".emcid-probe-")
    except OSError as exc:
        raise CacheError(f"cache folder {folder} is not writable ({exc.strerror}); {fix}") from None
    os.close(fd)
    os.unlink(probe)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """A safetensors file's bytes with its header's keys sorted: safetensors writes the
    metadata in a random order per process, so the same tensors would give other bytes."""
    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads its header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically, with the same bytes for the same content and the
    user's file mode. A failed write (a full disk) leaves no file and names the path."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = safetensors_bytes(contiguous, metadata)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_file_prefix(), suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        give_umask_modes(Path(tmp))  # mkstemp makes it 0600
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
    extra: str = "",
) -> None:
    """Write a safetensors file with a checksum (covering ``extra`` too), atomically."""
    metadata = {**(metadata or {}), "sha256": tensors_checksum(tensors, extra)}
    write_safetensors(path, tensors, metadata)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def read_tensor_names(path: Path) -> list[str]:
    """The names of the tensors a safetensors file holds, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`save_tensors_atomic`; ValueError if it is corrupted."""
    try:
        tensors = load_file(str(path))
        metadata = read_metadata(path)
    except Exception as exc:  # safetensors raises several types for truncated/garbled files
        raise ValueError(f"unreadable ({' '.join(str(exc).split())})") from None
    if metadata.get("sha256") != tensors_checksum(tensors):
        raise ValueError("fails its checksum")
    return tensors, metadata


def _discard(path: Path) -> None:
    """Remove a bad entry; where that is not allowed, it is simply recomputed each time."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove cache entry %s (%s); the result is kept in memory", path,
                    exc.strerror)


def load_tensors_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Read a cache entry; None (and removed where allowed) if corrupted, so it is recomputed."""
    try:
        return read_checked(path)
    except ValueError as exc:
        log.warning("cache entry %s is %s; recomputing", path, exc)
        _discard(path)
        return None


_USABLE_ROOTS: set[Path] = set()  # cache roots this process has found writable


class TensorCache:
    """One namespace of the cache: ``root/namespace/<key>.safetensors``."""

    writable = True

    def __init__(self, namespace: str, root: Path | None = None, enabled: bool = True):
        self.folder = (root or cache_root()) / namespace
        self.enabled = enabled
        if enabled:
            self._open()

    def _open(self) -> None:
        """Check the folder. One that was usable earlier in this run and no longer is (its
        permissions changed) only loses its writes, as a failed entry does, so the work goes on
        with its results kept in memory; the first open of a run refuses it."""
        root = Path(os.path.abspath(self.folder.parent))
        try:
            check_writable(self.folder)
        except CacheError as exc:
            if root not in _USABLE_ROOTS:
                raise
            log.warning("%s; this run's results are kept in memory", exc)
            self.writable = False
            return
        _USABLE_ROOTS.add(root)
        remove_stale_files(self.folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        if not self.enabled or not self.path(key).exists():
            return None
        return load_tensors_checked(self.path(key))

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        if not self.enabled or not self.writable:
            return
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        try:
            save_tensors_atomic(self.path(key), tensors, meta)
        except OSError as exc:
            log.warning("%s; the result is kept in memory", exc)
