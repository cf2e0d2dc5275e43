"""Failures of the machine and the environment say in one line what to change: an interrupted
run exits 130 keeping its work, a device this torch lacks is named, a cache behind a broken
symlink is refused before the work (and one that breaks during it only loses its writes), and
`generate -n` does not build its lists up front."""

import logging
import os

import pytest
import torch

import emcid
from emcid.cli import main
from emcid.core import generation
from emcid.core.cache import TensorCache
from emcid.core.generation import Repeated, check_seeds
from emcid.core.loading import check_device
from emcid.errors import CacheError, DeviceError, OptionError


def test_ctrl_c_says_interrupted_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(emcid, "load_model", interrupted)
    assert main(["generate", "--prompt", "a", "--out", str(tmp_path / "g")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("emcid: interrupted") and "\n" not in err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_device_this_torch_lacks_is_one_line(tmp_path, capsys):
    with pytest.raises(DeviceError, match="'mps' is not usable with this torch build"):
        check_device("mps")
    with pytest.raises(DeviceError, match="meta device holds no weights"):
        check_device("meta")
    assert main(["generate", "--device", "mps", "--prompt", "a", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("make,match", [
    (lambda link: os.symlink(link, link), "is a symlink loop"),
    (lambda link: os.symlink(link.parent / "gone", link), "which does not exist"),
])
def test_a_cache_behind_a_broken_symlink_is_refused_at_open(tmp_path, make, match):
    link = tmp_path / "cache"
    make(link)
    with pytest.raises(CacheError, match=match):
        TensorCache("stage1", root=link)


def test_a_cache_that_breaks_during_a_run_keeps_results_in_memory(tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    first = TensorCache("stage1", root=root)  # usable when the run starts
    first.save("a", {"x": torch.ones(2)})

    def unwritable(folder):
        raise CacheError(f"cache folder {folder} is not writable (Permission denied)")
    monkeypatch.setattr("emcid.core.cache.check_writable", unwritable)
    with caplog.at_level(logging.WARNING):
        later = TensorCache("stats", root=root)  # opened after Stage I, as the statistics are
    assert "kept in memory" in caplog.text
    later.save("b", {"x": torch.ones(2)})  # skipped, not raised
    assert not later.path("b").exists()
    assert first.load("a") is not None
    with pytest.raises(CacheError):
        TensorCache("stats", root=tmp_path / "never-used")  # a first open still refuses


def test_generate_builds_no_lists_for_many_images(tmp_path, sd1_dir, monkeypatch, capsys):
    seen = {}

    def record(bundle, prompts, seeds, **kwargs):
        seen.update(prompts=prompts, seeds=seeds)
        return iter(())
    monkeypatch.setattr(generation, "generate_batches", record)
    assert main(["generate", "--model", str(sd1_dir), "--prompt", "a cat", "-n", str(10**8),
                 "--out", str(tmp_path / "g")]) == 0
    assert isinstance(seen["prompts"], Repeated) and isinstance(seen["seeds"], range)
    assert len(seen["prompts"]) == len(seen["seeds"]) == 10**8
    assert seen["prompts"][5:8] == ["a cat"] * 3 and seen["prompts"][-1] == "a cat"
    with pytest.raises(IndexError):
        seen["prompts"][10**8]
    with pytest.raises(OptionError):
        check_seeds(range(2**63 - 2, 2**63 + 1))


def test_a_mistyped_folder_is_named_before_the_hub(tmp_path, monkeypatch):
    from emcid.errors import ModelLoadError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("sd15", "models/sd15"):
        with pytest.raises(ModelLoadError, match=f"no folder '{name}'") as caught:
            emcid.load_model(name)
        assert "cache" not in str(caught.value)


def test_a_patch_already_applied_says_so_and_force_says_what_it_overrode(tmp_path, sd1, caplog):
    from emcid.errors import PatchMismatchError
    from emcid.patch import DeltaWeight, EditPatch, save_pipeline

    name = sd1.slot("text_encoder").fc2_name(1)
    out_features, in_features = sd1.module(name).weight.shape
    patch = EditPatch({name: DeltaWeight(torch.ones(out_features, 1), torch.ones(1, in_features))},
                      {"base_fingerprint": sd1.fingerprint(), "method": "test", "requests": []})
    patch.apply(sd1)
    applied = emcid.load_model(save_pipeline(sd1, tmp_path / "applied"))
    with pytest.raises(PatchMismatchError, match="already applied to this model \\(step 1 of its chain\\)"):
        patch.apply(applied)
    with caplog.at_level(logging.WARNING):
        patch.apply(applied, force=True)
    assert "already applied" in caplog.text and "anyway (--force)" in caplog.text
