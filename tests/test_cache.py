"""Cache folders that cannot be used are reported before any work; bad entries never crash."""

import errno
import os
import pathlib
import tempfile

import pytest
import torch

from emcid.cache import TensorCache
from emcid.cli import main
from emcid.core import cache as cache_module
from emcid.errors import CacheError
from emcid.stats import second_moments


def _read_only(folder: pathlib.Path, monkeypatch) -> None:
    """Make ``folder`` read-only; as root (whom permissions do not stop) the writes fail too."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() != 0:
        return

    def denied(path) -> bool:
        return folder == pathlib.Path(path) or folder in pathlib.Path(path).parents

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and denied(dir):
            raise PermissionError(errno.EACCES, "Permission denied")
        return tempfile.mkstemp(*args, dir=dir, **kwargs)

    unlink = pathlib.Path.unlink

    def guarded_unlink(self, missing_ok=False):
        if denied(self):
            raise PermissionError(errno.EACCES, "Permission denied")
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(cache_module.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(pathlib.Path, "unlink", guarded_unlink)


def test_cache_that_is_a_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("EMCID_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CacheError, match="is a file, not a folder"):
        TensorCache("stats")
    TensorCache("stats", enabled=False)  # --no-cache needs no folder


def test_edit_with_a_file_as_cache_fails_before_stage1(tmp_path, sd1_dir, monkeypatch, capsys):
    from emcid.editors.emcid.stage1 import schedule as stage1

    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("EMCID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stage1, "compute_z", lambda *a, **k: pytest.fail("Stage I started"))
    requests = tmp_path / "r.yaml"
    requests.write_text("- {source: tench, destination: goldfish}\n")
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out",
                 str(tmp_path / "p.safetensors")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("emcid: error")]
    assert "is a file, not a folder" in line
    assert not (tmp_path / "p.safetensors").exists()


def test_read_only_cache_is_refused_at_start(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    _read_only(folder, monkeypatch)
    with pytest.raises(CacheError, match="not writable"):
        TensorCache("stats", root=folder)


def test_corrupt_entry_in_read_only_cache_recomputed_in_memory(tmp_path, sd1, monkeypatch, caplog):
    cache = TensorCache("stats", root=tmp_path / "cache")
    name = sd1.slot("text_encoder").fc2_name(0)
    captions = ["a photo of a tench", "a zebra", "the castle at night"]
    first = second_moments(sd1, [name], captions, cache=cache, progress=False)
    (entry,) = list(cache.folder.glob("*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0xFF
    entry.write_bytes(bytes(data))
    _read_only(tmp_path / "cache", monkeypatch)  # e.g. permissions changed during a run
    again = second_moments(sd1, [name], captions, cache=cache, progress=False)
    assert torch.equal(first[name], again[name])
    assert entry.read_bytes() == bytes(data)  # left alone: it could not be removed or rewritten
    assert "kept in memory" in caplog.text
