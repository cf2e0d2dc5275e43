"""No --out may destroy an input: refused in one line, exit 2, before any work, inputs unchanged."""

import hashlib
import os

import pytest
import yaml

from emcid.cli import main
from emcid.core.outputs import check_output

FAST = ["--steps", "1", "--stats-samples", "20", "--lam", "1.0", "--layers", "1-2"]


def _digests(*roots):
    """sha256 of every file under the given files and folders."""
    digests = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture
def request_file(tmp_path):
    path = tmp_path / "requests.yaml"
    path.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"}]))
    return path


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory, sd1_dir):
    path = tmp_path_factory.mktemp("patch") / "edit.safetensors"
    requests = path.parent / "r.yaml"
    requests.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"}]))
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out", str(path),
                 *FAST]) == 0
    return path


def _refused(capsys, argv, *inputs, match):
    before = _digests(*inputs)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err
    assert _digests(*inputs) == before


def test_edit_out_may_not_be_an_input(tmp_path, sd1_dir, request_file, capsys):
    weights = sd1_dir / "text_encoder" / "model.safetensors"
    assert weights.exists()
    for out, match in ((weights, "would overwrite the model"), (sd1_dir, "would overwrite the model"),
                       (request_file, "would overwrite the request file")):
        _refused(capsys, ["edit", "--model", str(sd1_dir), "--requests", str(request_file),
                          "--out", str(out), *FAST], sd1_dir, request_file, match=match)


def test_a_symlink_to_an_input_is_the_input(tmp_path, sd1_dir, request_file, capsys):
    link = tmp_path / "innocent.safetensors"
    link.symlink_to(request_file)
    _refused(capsys, ["edit", "--model", str(sd1_dir), "--requests", str(request_file), "--out",
                      str(link), *FAST], request_file, match="would overwrite the request file")


def test_export_lora_out_may_not_be_its_patch_or_another_suffix(tmp_path, patch_file, capsys):
    _refused(capsys, ["export-lora", "--patch", str(patch_file), "--out", str(patch_file)],
             patch_file, match="would overwrite the patch")
    _refused(capsys, ["export-lora", "--patch", str(patch_file), "--out", str(tmp_path / "L.bin")],
             patch_file, match="ending in .safetensors")
    assert not (tmp_path / "L.bin").exists()


def test_apply_and_revert_never_replace_a_folder_holding_an_input(tmp_path, sd1_dir, patch_file, capsys):
    holder = patch_file.parent
    _refused(capsys, ["apply", "--model", str(sd1_dir), "--patch", str(patch_file), "--out", str(holder)],
             sd1_dir, patch_file, match="replace a folder holding it")
    _refused(capsys, ["apply", "--model", str(sd1_dir), "--patch", str(patch_file), "--out",
                      str(sd1_dir / "unet")], sd1_dir, match="(it lies inside that folder)")


def test_generate_out_inside_the_model_is_refused(sd1_dir, capsys):
    _refused(capsys, ["generate", "--model", str(sd1_dir), "--prompt", "x", "--out", str(sd1_dir / "imgs")],
             sd1_dir, match="(it lies inside that folder)")
    assert not (sd1_dir / "imgs").exists()


def test_unwritable_or_wrong_kind_of_out_fails_before_work(tmp_path):
    from emcid.errors import OutputPathError

    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(OutputPathError, match="is a folder; give a file name"):
        check_output(folder, [], "file")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(OutputPathError, match="is a file; give a folder"):
        check_output(afile, [], "folder")
    with pytest.raises(OutputPathError, match="is a file, so nothing"):
        check_output(afile / "sub" / "p.safetensors", [], "file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(OutputPathError, match="not writable"):
            check_output(locked / "p.safetensors", [], "file")
    fine = check_output(tmp_path / "new" / "p.safetensors", [("model", tmp_path / "elsewhere")], "file")
    assert fine.name == "p.safetensors"
