"""The command line end to end on the tiny model: edit -> apply -> stock diffusers load; generate."""

import pytest
import torch
import yaml

from emcid.cli import main
from emcid.cli_commands import parse_layers
from emcid.errors import EmcidError

FAST_ARGS = ["--steps", "3", "--stats-samples", "50", "--lam", "1.0"]


@pytest.fixture
def request_file(tmp_path):
    path = tmp_path / "requests.yaml"
    path.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"},
                                    {"source": "zebra", "destination": "horse", "seed": 2}]))
    return path


def test_edit_apply_generate(tmp_path, sd1_dir, request_file):
    from diffusers import StableDiffusionPipeline

    from emcid import EditPatch, load_model

    patch_path = tmp_path / "edit.safetensors"
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(request_file), "--out",
                 str(patch_path), "--layers", "1-2", *FAST_ARGS]) == 0
    patch = EditPatch.load(patch_path)
    assert len(patch.metadata["requests"]) == 2
    assert sorted(patch.deltas) == [f"text_encoder.text_model.encoder.layers.{i}.mlp.fc2" for i in (1, 2)]

    out = tmp_path / "edited"
    assert main(["apply", "--model", str(sd1_dir), "--patch", str(patch_path), "--out", str(out)]) == 0
    stock = StableDiffusionPipeline.from_pretrained(out)  # plain diffusers, no emcid involved
    expected = load_model(sd1_dir)
    patch.apply(expected)
    for name in patch.deltas:
        _, _, rest = name.partition(".")
        reloaded = stock.text_encoder.get_submodule(rest.removeprefix("text_model.")).weight
        assert torch.allclose(reloaded, expected.module(name).weight)
    assert load_model(out).sampling == expected.sampling  # emcid settings travel along

    images = tmp_path / "images"
    assert main(["generate", "--model", str(sd1_dir), "--patch", str(patch_path), "--prompt",
                 "a photo of tench", "-n", "2", "--seed", "5", "--out", str(images)]) == 0
    assert sorted(p.name for p in images.iterdir()) == ["000005.png", "000006.png"]


def test_bad_input_is_a_clear_error(tmp_path, sd1_dir, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"source": "a", "destination": "b"}, {"source": "b", "destination": "c"}]))
    code = main(["edit", "--model", str(sd1_dir), "--requests", str(bad), "--out", str(tmp_path / "p")])
    assert code == 2
    assert "chain" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err


BAD_REQUEST_FILES = {
    "chain": ("r.yaml", yaml.safe_dump([{"source": "a", "destination": "b"},
                                        {"source": "b", "destination": "c"}]), "chain"),
    "malformed": ("r.yaml", "- {source: a, destination: [b\n", "malformed YAML"),
    "unknown field": ("r.json", '[{"source": "a", "destination": "b", "colour": "red"}]',
                      "unknown request fields"),
    "short csv header": ("r.csv", "source\ntench\n", "lacks the column"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUEST_FILES))
def test_bad_request_file_fails_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    import emcid.cli_commands

    monkeypatch.setattr(emcid.cli_commands, "_load", lambda args: pytest.fail("the model was loaded"))
    name, text, expected = BAD_REQUEST_FILES[case]
    (tmp_path / name).write_text(text)
    out = tmp_path / "p.safetensors"
    assert main(["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(tmp_path / name),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "nowhere" not in err
    assert not out.exists()


def test_parse_layers():
    assert parse_layers(["0-2,5"]) == {"text_encoder": [0, 1, 2, 5]}
    assert parse_layers(["text_encoder=8-10", "text_encoder_2=26-30"]) == {
        "text_encoder": [8, 9, 10], "text_encoder_2": [26, 27, 28, 29, 30]}
    with pytest.raises(EmcidError):
        parse_layers(["a-b"])


def _error_line(capsys) -> str:
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("emcid: error")]
    return line


def test_apply_over_its_model_refused_and_revert_one_step_at_a_time(tmp_path, sd1_dir, capsys):
    import shutil

    from emcid import EditRequest, edit, load_model

    model = shutil.copytree(sd1_dir, tmp_path / "model")
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    settings = {"steps": 3, "stats_samples": 50, "lam": 1.0, "layers": {"text_encoder": [1, 2]}}
    first = edit(load_model(model), [EditRequest("tench", "goldfish")], progress=False, **settings)
    first_path = first.save(tmp_path / "first.safetensors")
    for out in (model, model / "edited"):
        assert main(["apply", "--model", str(model), "--patch", str(first_path), "--out", str(out)]) == 2
        assert "would overwrite the model" in _error_line(capsys)
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before

    step1, step2 = tmp_path / "step1", tmp_path / "step2"
    assert main(["apply", "--model", str(model), "--patch", str(first_path), "--out", str(step1)]) == 0
    second = edit(load_model(step1), [EditRequest("zebra", "horse")], progress=False, **settings)
    second_path = second.save(tmp_path / "second.safetensors")
    assert main(["apply", "--model", str(step1), "--patch", str(second_path), "--out", str(step2)]) == 0
    assert len(load_model(step2).history) == 2

    back1, back0 = tmp_path / "back1", tmp_path / "back0"
    assert main(["revert", "--model", str(step2), "--patch", str(first_path), "--out", str(back1)]) == 2
    assert "reverted last first" in _error_line(capsys) and not back1.exists()
    assert main(["revert", "--model", str(step2), "--patch", str(second_path), "--out", str(back1)]) == 0
    assert main(["revert", "--model", str(back1), "--out", str(back0)]) == 0
    for reverted, expected in ((back1, step1), (back0, model)):
        got, want = load_model(reverted), load_model(expected)
        for component in ("text_encoder", "unet", "vae"):
            mine, theirs = getattr(got, component).state_dict(), getattr(want, component).state_dict()
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert main(["revert", "--model", str(back0), "--out", str(tmp_path / "back-1")]) == 2
    assert "no recorded patch" in _error_line(capsys)


def test_bad_patch_files_on_the_command_line(tmp_path, sd1_dir, capsys):
    weights = str(sd1_dir / "text_encoder" / "model.safetensors")
    out = tmp_path / "out"
    for extra in ([], ["--force"]):
        assert main(["apply", "--model", str(sd1_dir), "--patch", weights, "--out", str(out), *extra]) == 2
        assert "not an emcid patch" in _error_line(capsys)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert main(["apply", "--model", str(sd1_dir), "--patch", str(tmp_path / "empty.safetensors"),
                 "--out", str(out), "--force"]) == 2
    assert "is empty" in _error_line(capsys)
    assert not out.exists()


def test_multi_line_errors_print_as_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"source": "a",\n "destination": }\n]')
    assert main(["edit", "--requests", str(bad), "--out", str(tmp_path / "p")]) == 2
    assert "bad.json:3: malformed JSON" in _error_line(capsys)


def test_edit_lr_schedule_reaches_stage1_and_the_patch(tmp_path, sd1_dir, request_file, capsys):
    from emcid import EditPatch

    patch_path = tmp_path / "cosine.safetensors"
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(request_file), "--out",
                 str(patch_path), "--layers", "1-2", *FAST_ARGS, "--lr-schedule", "cosine"]) == 0
    assert EditPatch.load(patch_path).metadata["hparams"]["stage1"]["lr_schedule"] == "cosine"
    with pytest.raises(SystemExit):
        main(["edit", "--requests", str(request_file), "--out", str(tmp_path / "p"),
              "--lr-schedule", "linear"])
    assert "invalid choice: 'linear'" in capsys.readouterr().err


@pytest.mark.parametrize("side", ["source", "both"])
def test_edit_distil_on_reaches_stage1_and_the_patch(tmp_path, sd1_dir, request_file, side):
    from emcid import EditPatch

    patch_path = tmp_path / f"{side}.safetensors"
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(request_file), "--out",
                 str(patch_path), "--layers", "1-2", *FAST_ARGS, "--distil-on", side]) == 0
    assert EditPatch.load(patch_path).metadata["hparams"]["stage1"]["distil_on"] == side


def test_edit_stop_tolerance_stops_stage1_early_and_says_so(tmp_path, sd1_dir, request_file, caplog):
    from emcid import EditPatch

    patch_path = tmp_path / "early.safetensors"
    # 0.99: a window that does not fall by 99 % stops, so both concepts stop at min_steps (50),
    # the second 25-step window (the later --steps wins over FAST_ARGS's)
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(request_file), "--out",
                 str(patch_path), "--layers", "1-2", *FAST_ARGS, "--steps", "80",
                 "--stop-tolerance", "0.99"]) == 0
    patch = EditPatch.load(patch_path)
    assert patch.metadata["hparams"]["stage1"]["stop_tolerance"] == 0.99
    assert patch.metadata["stage1_steps"] == [50, 50]
    # Stage I's bill is shown without -v (third-party logging stays quiet)
    (cost,) = [r.getMessage() for r in caplog.records if "per concept-step" in r.getMessage()]
    assert "2 concepts" in cost and "at most 80 steps" in cost
