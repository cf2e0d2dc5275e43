"""``emcid bench professions``: the profession-list loaders, the shares and gaps by hand, the
CLIP zero-shot classifier, refusals before any work, and the run end to end on the tiny SD-1.x
model with a tiny random CLIP, and on the embedded world's colour words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emcid.bench.namelists import load_names
from emcid.bench.professions import (
    PROFESSION_TEMPLATE,
    ClipLabels,
    format_summary,
    gap_summary,
    label_shares,
    run_professions,
)
from emcid.cli import main
from emcid.errors import EmcidError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = {"steps": 2, "stats_samples": 64, "images": 2, "rounds": 1}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_clip(make_tiny_clip):
    return make_tiny_clip("a an photo of male female doctor nurse")


def test_a_csv_with_prompts_and_a_plain_list_load_with_their_lines(tmp_path):
    listed = load_names(_write(tmp_path / "p.csv", "profession,prompt\ndoctor,a doctor at work\n"
                                                   "nurse,a nurse\ndoctor,a doctor smiling\n"), "profession")
    assert [(p.name, p.prompts, p.line) for p in listed] == [
        ("doctor", ("a doctor at work", "a doctor smiling"), 2), ("nurse", ("a nurse",), 3)]
    plain = load_names(_write(tmp_path / "p.txt", "# a comment\n\ndoctor\nengineer\n"), "profession")
    assert [(p.name, p.prompts, p.line) for p in plain] == [("doctor", (), 3), ("engineer", (), 4)]
    example = load_names(EXAMPLES / "professions.txt", "profession")
    assert [p.name for p in example][:3] == ["doctor", "nurse", "engineer"] and len(example) == 6


@pytest.mark.parametrize("text, message", [
    ("job,prompt\ndoctor,a doctor\n", r"p\.csv: no column 'profession'"),
    ("profession\ndoctor\n\n\n", None),
    ("profession,prompt\ndoctor,a doctor\n,a nurse\n", r"p\.csv line 3: the cell of column 'profession'"),
])
def test_a_missing_column_or_cell_names_the_file_and_column_or_line(tmp_path, text, message):
    path = _write(tmp_path / "p.csv", text)
    if message is None:
        assert [p.name for p in load_names(path, "profession")] == ["doctor"]
        return
    with pytest.raises(EmcidError, match=message):
        load_names(path, "profession")


def test_shares_and_gaps_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert label_shares(scores) == [0.5, 0.5]
    three = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.0, 0.1, 0.9]])
    assert label_shares(three) == [1 / 3, 0, 2 / 3]
    figures = gap_summary([[1.0, 0.0], [0.75, 0.25]], [[0.5, 0.5], [0.25, 0.75]])
    assert figures == {"mean_gap_before": pytest.approx(0.375), "mean_gap_after": pytest.approx(0.125)}
    thirds = gap_summary([[0.5, 0.25, 0.25]], [[1 / 3, 1 / 3, 1 / 3]])
    assert thirds == {"mean_gap_before": pytest.approx(0.5 - 1 / 3), "mean_gap_after": pytest.approx(0.0)}
    assert PROFESSION_TEMPLATE.format("an engineer") == "a photo of an engineer"


def test_clip_labels_are_the_softmax_of_clips_logits(tiny_clip):
    classify = ClipLabels(str(tiny_clip))
    classify.judge.batch_size = 2  # several batches
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    labels = ["a male doctor", "a female doctor"]
    probs = classify(images, labels)
    judge = classify.judge
    with torch.no_grad():
        tokens = judge.tokenizer(labels, padding=True, return_tensors="pt")
        logits = judge.model(**tokens, pixel_values=judge._pixels(images)).logits_per_image
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-5) and probs.shape == (3, 2)
    assert classify.describe()["id"] == str(tiny_clip)


@pytest.mark.parametrize("settings, message", [
    ({"images": 0}, "images=0"),
    ({"options": {"tolerance": 1.5}}, "tolerance=1.5"),
    ({"options": {"tolerance": -0.1}}, "tolerance"),
    ({"options": {"images": 0}}, "images >= 1"),
    ({"options": {"stepz": 3}}, "stepz"),
    ({"options": {"classifier": "x"}}, "give it with --clip"),
    ({"professions_file": None}, "give --professions"),
    ({"concepts": 3}, "--concepts counts"),
    ({"model": None}, "drop --professions"),
    ({"attributes": ["male", "Male"]}, r"p\.txt line 1: .*'doctor' repeats a value"),
    ({"clip": "nobody/no-such-clip"}, "'nobody/no-such-clip'"),
])
def test_bad_settings_are_refused_before_the_model_loads(sd1_dir, tmp_path, monkeypatch, settings, message):
    monkeypatch.setattr("emcid.bench.professions.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    listed = _write(tmp_path / "p.txt", "doctor\nnurse\n")
    settings = {"model": sd1_dir, "professions_file": listed, "clip": "unused", **settings}
    with pytest.raises(EmcidError, match=message):
        run_professions(out=tmp_path / "out", progress=False, **settings)
    assert not (tmp_path / "out").exists()


def test_a_clip_that_cannot_load_is_one_line_naming_it(sd1_dir, tmp_path, capsys):
    listed = _write(tmp_path / "p.txt", "doctor\n")
    assert main(["bench", "professions", "--model", str(sd1_dir), "--professions", str(listed),
                 "--clip", "nobody/no-such-clip", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'nobody/no-such-clip'" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [(["--threshold", "1.5"], "tolerance=1.5"),
                                            (["--images", "0"], "images=0"),
                                            (["--attributes", "male", "Male"], "repeats a value")])
def test_the_command_line_refuses_before_work(sd1_dir, tmp_path, capsys, flags, message):
    listed = _write(tmp_path / "p.txt", "doctor\n")
    assert main(["bench", "professions", "--model", str(sd1_dir), "--professions", str(listed),
                 "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_out_never_overwrites_the_professions_file(sd1_dir, tmp_path):
    listed = _write(tmp_path / "p.txt", "doctor\n")
    with pytest.raises(EmcidError, match="would overwrite the professions"):
        run_professions(sd1_dir, listed, out=listed)


def test_the_run_on_tiny_sd_records_settings_and_figures_and_repeats(sd1_dir, tiny_clip, tmp_path):
    listed = _write(tmp_path / "p.csv", "profession,prompt\ndoctor,a photo of a doctor\nnurse,a nurse\n"
                                        "nurse,a photo of a nurse\n")
    runs = [run_professions(sd1_dir, listed, clip=str(tiny_clip), out=tmp_path / f"out{k}", options=FAST,
                            images=2, seed=3, progress=False) for k in range(2)]
    saved = json.loads((tmp_path / "out0" / "results.json").read_text())
    assert saved["complete"] is True and saved["benchmark"] == "professions" and saved["method"] == "emcid"
    assert saved["attributes"] == ["male", "female"] and saved["classifier"]["id"] == str(tiny_clip)
    settings = saved["settings"]
    assert settings["images"] == 2 and settings["seeds"] == [3, 4] and settings["tuning_seeds"] == [5, 6]
    assert settings["tuning"]["images"] == 2 and settings["tuning"]["rounds"] == 1
    records = saved["professions"]
    assert [(r["source"], r["prompts"]) for r in records] == [
        ("doctor", ["a photo of a doctor"]), ("nurse", ["a nurse", "a photo of a nurse"])]
    assert records[0]["labels"] == ["a male doctor", "a female doctor"]
    for record in records:
        images = settings["images"] * len(record["prompts"])
        for key in ("before", "after"):
            assert sum(record[key]) == pytest.approx(1.0)
            assert all(round(share * images) == pytest.approx(share * images) for share in record[key])
        assert record["gap_before"] == pytest.approx(abs(record["before"][0] - 0.5))
    assert saved["summary"]["mean_gap_after"] == pytest.approx(np.mean([r["gap_after"] for r in records]))
    assert runs[0]["professions"] == runs[1]["professions"] and runs[0]["summary"] == runs[1]["summary"]
    assert "mean distance from an even split" in format_summary(saved)


def _world_present() -> bool:
    from emcid.mini import tasks_dir, weights_present

    return weights_present() and (tasks_dir() / "unet" / "config.json").exists()


@pytest.mark.skipif(not _world_present(), reason="shipped mini weights absent")
def test_the_embedded_world_debiases_colour_words_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "world"
    options = ["steps=2", "stats_samples=1000", 'layers={"text_encoder": [10]}', "images=4", "rounds=1"]
    assert main(["bench", "professions", "--concepts", "1", "--images", "4", "--out", str(out),
                 *[f"--option={o}" for o in options]]) == 0
    assert "mean distance from an even split" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "professions-world" and saved["model"] == "embedded:tasks"
    assert saved["classifier"]["kind"] == "mini" and saved["attributes"] is None
    (record,) = saved["professions"]
    assert record["before"][0] == 1.0 and record["prompts"] == [f"an image of a {record['source']}"]
    assert saved["summary"]["mean_gap_before"] == 0.5
    assert saved["settings"]["seeds"] == [0, 1, 2, 3] and saved["settings"]["tuning_seeds"] == [4, 7]
