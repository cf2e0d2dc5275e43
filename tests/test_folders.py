"""Nothing the user owns is replaced, half-swapped or half-written: pipeline folders emcid did
not write are refused, an `apply` killed between its two renames is finished by the next run,
incomplete checkpoints are refused, and files come out with the same bytes and the user's mode."""

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import emcid
from emcid.cli import main
from emcid.core.cache import TensorCache, write_safetensors
from emcid.core.folders import recover_swap
from emcid.errors import ModelLoadError, PatchFileError, WriteError
from emcid.patch import DeltaWeight, EditPatch, save_pipeline


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _patch(bundle, seed: int = 0) -> EditPatch:
    generator = torch.Generator().manual_seed(seed)
    name = bundle.slot("text_encoder").fc2_name(1)
    out_features, in_features = bundle.module(name).weight.shape
    delta = DeltaWeight(torch.randn(out_features, 1, generator=generator),
                        torch.randn(1, in_features, generator=generator))
    return EditPatch({name: delta}, {"base_fingerprint": bundle.fingerprint(), "method": "test",
                                     "requests": [{"source": f"concept {seed}"}]})


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def patch_file(tmp_path, sd1):
    return _patch(sd1).save(tmp_path / "p.safetensors")


def test_apply_refuses_a_pipeline_emcid_did_not_write(tmp_path, sd1_dir, patch_file, capsys):
    theirs = shutil.copytree(sd1_dir, tmp_path / "theirs")
    before = _digest(theirs)
    argv = ["apply", "--model", str(sd1_dir), "--patch", str(patch_file), "--out", str(theirs)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "emcid did not write" in err and "--overwrite" in err and "\n" not in err
    assert _digest(theirs) == before
    assert main([*argv, "--overwrite"]) == 0
    assert emcid.load_model(theirs).history  # replaced, as asked


def test_apply_replaces_its_own_output_but_not_another_base_models(tmp_path, sd1_dir, sdxl_dir,
                                                                    patch_file, capsys):
    out = tmp_path / "edited"
    argv = ["apply", "--model", str(sd1_dir), "--patch", str(patch_file), "--out", str(out)]
    assert main(argv) == 0 and main(argv) == 0  # the same base: an earlier output is replaced
    before = _digest(out)
    other = emcid.load_model(sdxl_dir)
    with pytest.raises(PatchFileError, match="an edit of another base model"):
        save_pipeline(other, out)
    assert _digest(out) == before
    capsys.readouterr()


def test_a_swap_killed_between_its_renames_is_finished_by_the_next_run(tmp_path, sd1_dir):
    out = tmp_path / "edited"
    first = emcid.load_model(sd1_dir)
    _patch(first, 1).apply(first)
    save_pipeline(first, out)
    script = textwrap.dedent(f"""
        import os, pathlib, torch
        import emcid
        from emcid.patch import DeltaWeight, EditPatch, save_pipeline
        bundle = emcid.load_model({str(sd1_dir)!r})
        name = bundle.slot("text_encoder").fc2_name(2)
        o, i = bundle.module(name).weight.shape
        EditPatch({{name: DeltaWeight(torch.ones(o, 1), torch.ones(1, i))}},
                  {{"base_fingerprint": bundle.fingerprint(), "method": "test",
                    "requests": [{{"source": "second"}}]}}).apply(bundle)
        rename = pathlib.Path.rename
        def die_after_moving_aside(self, target):
            result = rename(self, target)
            if ".emcid-old-" in str(target):
                os._exit(9)  # killed between the two renames
            return result
        pathlib.Path.rename = die_after_moving_aside
        save_pipeline(bundle, {str(out)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert not out.exists()
    assert any(".emcid-old-" in p.name for p in tmp_path.iterdir())
    recovered = emcid.load_model(out)  # the next run finishes the swap: the new folder is complete
    assert [s["sources"] for s in recovered.history] == [["second"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_a_folder_moved_aside_without_its_replacement_is_put_back(tmp_path, sd1_dir):
    out = tmp_path / "model"
    aside = tmp_path / f".model.emcid-old-{_dead_pid()}"
    shutil.copytree(sd1_dir, aside)
    (tmp_path / f".model.emcid-tmp-{_dead_pid()}").mkdir()  # another run's unfinished write
    recover_swap(out)
    assert (out / "model_index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temporary_files_are_removed_when_the_cache_opens(tmp_path):
    folder = tmp_path / "cache" / "stage1"
    folder.mkdir(parents=True)
    stale = folder / f".emcid-tmp-{_dead_pid()}-abc.tmp"
    mine = folder / f".emcid-tmp-{os.getpid()}-def.tmp"
    stale.write_bytes(b"half"), mine.write_bytes(b"in progress")
    TensorCache("stage1", root=tmp_path / "cache")
    assert not stale.exists() and mine.exists()


def _copy_with(tmp_path, sd1_dir, component, edit):
    folder = shutil.copytree(sd1_dir, tmp_path / "broken")
    name = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
    path = folder / component / f"{name}.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def _drop_fc2(tensors):
    del tensors[next(k for k in sorted(tensors) if k.endswith("mlp.fc2.weight"))]


def _add_extra(tensors):
    tensors["extra.weight"] = torch.zeros(2)


def _drop_last_weight(tensors):
    del tensors[sorted(k for k in tensors if k.endswith("weight"))[-1]]


@pytest.mark.parametrize("component,edit,match", [
    ("text_encoder", _drop_fc2, r"text_encoder lacks 1 weight\(s\).*fc2.weight"),
    ("text_encoder", _add_extra, r"text_encoder holds 1 weight\(s\).*extra.weight"),
    ("unet", _drop_last_weight, r"unet lacks 1 weight\(s\)"),
])
def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path, sd1_dir, component, edit, match):
    folder = _copy_with(tmp_path, sd1_dir, component, edit)
    with pytest.raises(ModelLoadError, match=match):
        emcid.load_model(folder)


def test_a_garbled_model_index_is_named(tmp_path, sd1_dir, capsys):
    folder = shutil.copytree(sd1_dir, tmp_path / "garbled")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "model_index.json is not a valid diffusers index" in err and "hub" not in err


def test_the_same_patch_gives_the_same_bytes_in_every_process(tmp_path, patch_file):
    script = ("import sys; from emcid import EditPatch; "
              "EditPatch.load(sys.argv[1]).save(sys.argv[2])")
    digests = set()
    for run in range(4):
        out = tmp_path / f"copy{run}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(patch_file), str(out)], check=True)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    assert EditPatch.load(tmp_path / "copy0.safetensors").checksum == EditPatch.load(patch_file).checksum


def test_files_get_the_users_umask(tmp_path, sd1):
    old = os.umask(0o027)
    try:
        path = _patch(sd1).save(tmp_path / "p.safetensors")
        folder = save_pipeline(sd1, tmp_path / "pipe")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    weights = folder / "text_encoder" / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o640 and folder.stat().st_mode & 0o777 == 0o750


def test_a_full_disk_leaves_no_file_and_names_the_path(tmp_path, monkeypatch):
    def full(fd, mode):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fdopen", full)
    target = tmp_path / "out.safetensors"
    with pytest.raises(WriteError, match=f"cannot write {target}: No space left on device"):
        write_safetensors(target, {"x": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []
