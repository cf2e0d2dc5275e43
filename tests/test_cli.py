"""The command line end to end on the tiny model: edit -> apply -> stock diffusers load; generate."""

import pytest
import torch
import yaml

from emcid.cli import main, parse_layers
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
                 "a photo of tench", "--n", "2", "--seed", "5", "--out", str(images)]) == 0
    assert sorted(p.name for p in images.iterdir()) == ["000005.png", "000006.png"]


def test_bad_input_is_a_clear_error(tmp_path, sd1_dir, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"source": "a", "destination": "b"}, {"source": "b", "destination": "c"}]))
    code = main(["edit", "--model", str(sd1_dir), "--requests", str(bad), "--out", str(tmp_path / "p")])
    assert code == 2
    assert "chain" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers(["0-2,5"]) == {"text_encoder": [0, 1, 2, 5]}
    assert parse_layers(["text_encoder=8-10", "text_encoder_2=26-30"]) == {
        "text_encoder": [8, 9, 10], "text_encoder_2": [26, 27, 28, 29, 30]}
    with pytest.raises(EmcidError):
        parse_layers(["a-b"])
