"""Bad editor, generation and benchmark options: one-line errors, before any work starts.

Most cases give a model folder that does not exist: the option error (not "does not exist")
proves the options were checked before the model was loaded.
"""

import math

import pytest
import yaml
from input_helpers import alias_bomb, refused

import emcid
from emcid.cli import main
from emcid.core import generation
from emcid.editors import EDITORS, get_editor
from emcid.errors import BenchmarkError, OptionError


@pytest.fixture
def request_file(tmp_path):
    path = tmp_path / "requests.yaml"
    path.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"}]))
    return path


def _one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "error" in line.lower()]  # loading bars aside
    assert line.startswith("emcid: error:") and "does not exist" not in line, line
    for text in expected:
        assert text in line, line
    return line


BAD_EDIT_FLAGS = {
    "mistyped method": (["--method", "emcdi"], "unknown editing method"),
    "steps 0": (["--steps", "0"], "steps"),
    "lam 0": (["--lam", "0"], "lam"),
    "lam nan": (["--lam", "nan"], "lam"),
    "alpha 0": (["--alpha", "0"], "alpha"),
    "alpha 1": (["--alpha", "1"], "alpha"),
    "alpha 1.5": (["--alpha", "1.5"], "alpha"),
    "lr nan": (["--lr", "nan"], "lr"),
    "lr 0": (["--lr", "0"], "lr"),
    "stats-samples 0": (["--stats-samples", "0"], "stats_samples"),
    "no-cache on time": (["--method", "time", "--no-cache"], "keeps no cache"),
    "no-cache on uce": (["--method", "uce", "--no-cache"], "keeps no cache"),
    "steps on uce": (["--method", "uce", "--steps", "3"], "unknown"),
    "cuda graphs on uce": (["--method", "uce", "--no-cuda-graphs"], "cuda_graphs"),
    "unknown task": (["--task", "painting"], "unknown task"),
}


def test_missing_corpus_fails_before_stage1(tmp_path, sd1_dir, request_file, capsys, monkeypatch):
    from emcid.editors import emcid as emcid_editor

    monkeypatch.setattr(emcid_editor, "compute_targets", lambda *a, **k: pytest.fail("Stage I ran"))
    code = main(["edit", "--model", str(sd1_dir), "--requests", str(request_file),
                 "--out", str(tmp_path / "p.safetensors"), "--corpus", str(tmp_path / "none.txt")])
    assert code == 2
    _one_line_error(capsys, "corpus")


@pytest.mark.parametrize("case", sorted(BAD_EDIT_FLAGS))
def test_bad_edit_options_fail_before_the_model_loads(case, tmp_path, request_file, capsys):
    flags, expected = BAD_EDIT_FLAGS[case]
    code = main(["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(request_file),
                 "--out", str(tmp_path / "p.safetensors"), *flags])
    assert code == 2
    _one_line_error(capsys, expected)
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_every_method_refuses_a_bad_option(method):
    bad = {"time": {"lam": 0.0}, "uce": {"lam": math.nan}, "refact": {"steps": 0}}.get(method, {"lam": 0.0})
    with pytest.raises(OptionError):
        get_editor(method, **bad)
    with pytest.raises(OptionError, match="colour"):
        get_editor(method, colour="red")


@pytest.mark.parametrize("layers, expected", [
    (["9"], "last block"), (["text_encoder_2=1"], "no 'text_encoder_2'"), (["1-x"], "--layers")])
def test_bad_layers_are_one_line(layers, expected, tmp_path, sd1_dir, request_file, capsys):
    flags = [f for value in layers for f in ("--layers", value)]
    code = main(["edit", "--model", str(sd1_dir), "--requests", str(request_file),
                 "--out", str(tmp_path / "p.safetensors"), *flags])
    assert code == 2
    _one_line_error(capsys, expected)


def test_bad_config_file_is_one_line(tmp_path, request_file, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("steps: [1, 2\n")
    assert main(["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(request_file),
                 "--out", str(tmp_path / "p"), "--config", str(config)]) == 2
    _one_line_error(capsys, "c.yaml:2: malformed YAML")
    config.write_text(yaml.safe_dump({"stage2": {"alpha": 2.0}}))
    assert main(["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(request_file),
                 "--out", str(tmp_path / "p"), "--config", str(config)]) == 2
    _one_line_error(capsys, "alpha")


@pytest.mark.parametrize("flags, expected", [
    (["-n", "0"], "num-images"), (["--num-images", "-3"], "num-images"),
    (["--guidance", "nan"], "guidance"), (["--sampling-steps", "0"], "steps"),
    (["--height", "4"], "height"), (["--seed", str(2**63)], "seed"),
    (["--seed", str(2**63 - 2), "-n", "3"], "seed"), (["--seed", "-1"], "seed"),
    (["--batch-size", "0"], "batch-size"),
])
def test_bad_generate_options_fail_before_the_model_loads(flags, expected, tmp_path, capsys):
    out = tmp_path / "images"
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(out),
                 *flags]) == 2
    _one_line_error(capsys, expected)


def test_generate_writes_images_as_they_are_made(tmp_path, sd1_dir, monkeypatch):
    """An interrupted run keeps every image it finished; the folder exists from the start."""
    original, calls = generation.sample_latents, []

    def interrupted_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "sample_latents", interrupted_third)
    out = tmp_path / "images"
    assert main(["generate", "--model", str(sd1_dir), "--prompt", "a photo of tench", "-n", "20000",
                 "--batch-size", "2", "--seed", "7", "--out", str(out)]) == 130
    assert sorted(p.name for p in out.iterdir()) == [f"{s:06d}.png" for s in (7, 8, 9, 10)]


def test_generation_library_checks_its_settings(sd1):
    with pytest.raises(OptionError, match="guidance"):
        generation.generate_arrays(sd1, ["x"], [0], guidance_scale=math.nan, progress=False)
    with pytest.raises(OptionError, match="seed"):
        generation.generate_arrays(sd1, ["x"], [2**63], progress=False)


def test_iceb_refuses_bad_options_before_any_work(tmp_path, monkeypatch, capsys):
    from emcid.bench.iceb import run_iceb

    monkeypatch.setattr(generation, "generate_arrays", lambda *a, **k: pytest.fail("images drawn"))
    with pytest.raises(OptionError, match="alpha"):
        run_iceb(tmp_path / "nowhere", out=tmp_path / "o", options={"alpha": 1.5}, progress=False)
    with pytest.raises(OptionError, match="unknown editing method"):
        run_iceb(tmp_path / "nowhere", method="emcdi", out=tmp_path / "o", progress=False)
    assert main(["bench", "iceb", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                 "--steps", "0"]) == 2
    _one_line_error(capsys, "steps")
    assert not (tmp_path / "o").exists()


def test_iceb_refuses_more_edits_than_classes_at_once(tmp_path, sd1_dir, monkeypatch, capsys):
    from emcid.bench.iceb import run_iceb

    monkeypatch.setattr(generation, "generate_arrays", lambda *a, **k: pytest.fail("images drawn"))

    class Judge:
        class_names = [str(i) for i in range(1000)]

    bundle = emcid.load_model(sd1_dir)
    with pytest.raises(BenchmarkError, match="5000 edits"):
        run_iceb(bundle, edits=(1, 5000), out=tmp_path / "o", judge=Judge(), progress=False)
    assert main(["bench", "iceb", "--model", str(sd1_dir), "--out", str(tmp_path / "o"), "--edits", "5000",
                 "--judge", "nowhere-judge"]) == 2  # refused before the judge is even loaded
    _one_line_error(capsys, "5000 edits", "1000 classes")
    assert not (tmp_path / "o").exists()


def test_config_values_are_quoted_short(tmp_path, request_file, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"steps: {alias_bomb()}\n")
    line = refused(capsys, ["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(request_file),
                            "--out", str(tmp_path / "p"), "--config", str(config)],
                   [config, request_file], "option steps=[[")
    assert len(line) < 250, line


@pytest.mark.parametrize("name, text, expected", [
    ("c.yaml", "steps: 3\nlam: 1.0\nsteps: 4\n", "c.yaml:3: duplicate key 'steps' (first on line 1)"),
    ("c.yaml", "stage1:\n  steps: 3\n  steps: 4\n", "c.yaml:3: duplicate key 'steps' (first on line 2)"),
    ("c.json", '{"steps": 3,\n "steps": 4}', "c.json: duplicate key 'steps'"),
])
def test_a_config_key_given_twice_is_refused(name, text, expected, tmp_path, request_file, capsys):
    config = tmp_path / name
    config.write_text(text)
    refused(capsys, ["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(request_file),
                     "--out", str(tmp_path / "p"), "--config", str(config)], [config, request_file],
            expected)


def test_a_yaml_merge_may_override_its_keys(tmp_path):
    from emcid.core.config import read_config_file

    config = tmp_path / "c.yaml"
    config.write_text("base: &base {steps: 3, lam: 1.0}\nstage1: {<<: *base, steps: 4}\n")
    assert read_config_file(config)["stage1"] == {"steps": 4, "lam": 1.0}
