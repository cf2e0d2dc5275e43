"""I2P nudity erasure: the CSV loader, the nudity figures, NudeNet run for real (on a drawn
face, a photograph shipped with matplotlib and the tiny model's images) and ``bench i2p`` end to
end on the tiny model with examples/i2p.csv."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter

from emcid.bench import nudity
from emcid.bench.i2p import format_summary, load_i2p, run_i2p
from emcid.bench.nudity import NUDENET_LABELS, NUDITY_CLASSES, NudityDetector, nudity_figures
from emcid.errors import EmcidError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HEADER = "prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height,nudity_percentage\n"


def _write(tmp_path, text, name="i2p.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def detector():
    return NudityDetector()


# --- the loader ------------------------------------------------------------------------------


def test_example_file_loads_the_sexual_rows():
    rows = load_i2p(EXAMPLES / "i2p.csv")
    assert [r.line for r in rows] == [2, 3, 5, 6]
    first = rows[0]
    assert first.prompt.startswith("portrait of a woman lounging") and first.categories == ("sexual",)
    assert (first.seed, first.guidance, first.width, first.height) == (2539888340, 7.0, 512, 512)
    assert first.nudity_percentage == 40.0
    assert rows[2].guidance == 9.0 and rows[2].height == 768
    assert rows[3].categories == ("hate", "sexual")  # a comma-separated cell, quoted
    assert len(load_i2p(EXAMPLES / "i2p.csv", category=None)) == 6
    assert [r.line for r in load_i2p(EXAMPLES / "i2p.csv", category="Violence")] == [4]
    assert [r.line for r in load_i2p(EXAMPLES / "i2p.csv", limit=2)] == [2, 3]
    assert [r.line for r in load_i2p(EXAMPLES / "i2p.csv", min_nudity=60)] == [3, 6]
    with pytest.raises(EmcidError, match=r"i2p\.csv: 5 images asked for, but the file has 4 rows of "
                                         "category 'sexual'"):
        load_i2p(EXAMPLES / "i2p.csv", limit=5)


def test_optional_columns_and_other_layouts(tmp_path):
    bare = _write(tmp_path, 'prompt\n"a field, at dawn"\n\nthe sea\n', "bare.csv")
    rows = load_i2p(bare, category=None)
    assert [(r.line, r.prompt, r.seed, r.guidance, r.categories) for r in rows] == [
        (2, "a field, at dawn", None, None, ()), (4, "the sea", None, None, ())]
    with pytest.raises(EmcidError, match=r"bare\.csv: no column 'categories'.*--category all"):
        load_i2p(bare)
    with pytest.raises(EmcidError, match="no column 'nudity_percentage'"):
        load_i2p(bare, category=None, min_nudity=50)
    # ESD's and UCE's copies: a leading index column, evaluation_seed / evaluation_guidance
    esd = _write(tmp_path, ",prompt,categories,evaluation_seed,evaluation_guidance,case_number\n"
                           '0,"a long\nprompt",sexual,1234.0,7.5,0\n1,a lake,sexual,,,1\n', "esd.csv")
    rows = load_i2p(esd)
    assert [(r.line, r.prompt, r.seed, r.guidance) for r in rows] == [
        (2, "a long\nprompt", 1234, 7.5), (4, "a lake", None, None)]


def test_a_missing_prompt_column_names_it_and_the_file(tmp_path):
    path = _write(tmp_path, "text,categories\na lake,sexual\n", "noprompt.csv")
    with pytest.raises(EmcidError, match=r"noprompt\.csv: no column 'prompt'"):
        load_i2p(path)


@pytest.mark.parametrize("bad_row, message", [
    ("a lake,sexual,abc,7,512,512,10", "line 3: column 'sd_seed' holds 'abc'; give an integer"),
    ("a lake,sexual,1.5,7,512,512,10", "line 3: column 'sd_seed' holds '1.5'"),
    ("a lake,sexual,-1,7,512,512,10", "line 3: column 'sd_seed' holds '-1'"),
    ("a lake,sexual,1,-2,512,512,10", "line 3: column 'sd_guidance_scale' holds '-2'; give a number"),
    ("a lake,sexual,1,inf,512,512,10", "line 3: column 'sd_guidance_scale' holds 'inf'"),
    ("a lake,sexual,1,7,4,512,10", "line 3: column 'sd_image_width' holds '4'"),
    ("a lake,sexual,1,7,512,512,150", "line 3: column 'nudity_percentage' holds '150'"),
    (",sexual,1,7,512,512,10", "line 3: the cell of column 'prompt' is empty"),
    ("a lake,sexual,1,7", "line 3: 4 cells, but the header has 7 columns"),
])
def test_a_bad_value_names_the_file_line_and_column(tmp_path, bad_row, message):
    path = _write(tmp_path, HEADER + "a sea,sexual,1,7,512,512,10\n" + bad_row + "\n", "bad.csv")
    with pytest.raises(EmcidError, match=r"bad\.csv " + message.replace("(", r"\(")):
        load_i2p(path)


def test_empty_files_are_refused(tmp_path):
    with pytest.raises(EmcidError, match="the file is empty"):
        load_i2p(_write(tmp_path, ""))
    with pytest.raises(EmcidError, match="a header but no rows"):
        load_i2p(_write(tmp_path, HEADER))
    with pytest.raises(EmcidError, match="no such I2P file"):
        load_i2p(tmp_path / "missing.csv")


# --- the figures -----------------------------------------------------------------------------


def _det(label, score):
    return {"class": label, "score": score, "box": [0, 0, 4, 4]}


DETECTIONS = [
    [_det("FEMALE_BREAST_EXPOSED", 0.9), _det("FACE_FEMALE", 0.95), _det("BELLY_EXPOSED", 0.55)],
    [_det("FEMALE_BREAST_EXPOSED", 0.61), _det("FEMALE_BREAST_EXPOSED", 0.7), _det("FEET_EXPOSED", 0.6)],
    [],
    [_det("BUTTOCKS_COVERED", 0.99), _det("ARMPITS_EXPOSED", 0.3)],
]


def test_nudity_figures_by_hand():
    at_06 = nudity_figures(DETECTIONS, 0.6)
    # score > 0.6: breast 0.9, 0.61, 0.7 (feet at exactly 0.6, belly 0.55 and armpits 0.3 do not count)
    assert at_06["detections"] == {**dict.fromkeys(NUDITY_CLASSES, 0), "FEMALE_BREAST_EXPOSED": 3}
    assert (at_06["images"], at_06["total"], at_06["nude_images"], at_06["nude_fraction"]) == (4, 3, 2, 0.5)
    at_0 = nudity_figures(DETECTIONS, 0.0)  # the ESD/UCE scripts: every exposed detection
    assert at_0["detections"]["BELLY_EXPOSED"] == 1 and at_0["detections"]["FEET_EXPOSED"] == 1
    assert at_0["detections"]["ARMPITS_EXPOSED"] == 1 and at_0["total"] == 6
    assert (at_0["nude_images"], at_0["nude_fraction"]) == (3, 0.75)
    feet = nudity_figures(DETECTIONS, 0.5, classes=("FEET_EXPOSED", "FACE_FEMALE"))
    assert feet["detections"] == {"FEET_EXPOSED": 1, "FACE_FEMALE": 1} and feet["nude_images"] == 2
    assert nudity_figures(DETECTIONS, 1.0)["total"] == 0
    with pytest.raises(EmcidError, match="at least one image"):
        nudity_figures([], 0.6)


def test_the_class_list_is_nudenets():
    from nudenet import nudenet as module

    assert NUDENET_LABELS == tuple(module.__labels)  # the names its detect() returns
    assert set(NUDITY_CLASSES) <= set(NUDENET_LABELS) and all(c.endswith("_EXPOSED") for c in NUDITY_CLASSES)
    assert len(NUDITY_CLASSES) == 9
    with pytest.raises(EmcidError, match="give distinct NudeNet labels"):
        nudity.check_classes(["FEMALE_BREAST_EXPOSED", "NAKED"])


def test_without_nudenet_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet raises ImportError
    with pytest.raises(EmcidError, match=r"pip install 'emcid\[i2p\]'"):
        NudityDetector()


# --- NudeNet, for real -----------------------------------------------------------------------


def drawn_face() -> Image.Image:
    """A fixed synthetic picture: a cartoon face (NudeNet finds FACE_FEMALE in it, score ~0.36)."""
    image = Image.new("RGB", (256, 256), (230, 230, 230))
    draw = ImageDraw.Draw(image)
    skin = (240, 200, 170)
    draw.ellipse((50, 20, 206, 200), fill=(60, 40, 30))
    draw.rectangle((100, 190, 156, 256), fill=skin)
    draw.ellipse((70, 50, 186, 210), fill=skin)
    for x in (100, 156):
        draw.ellipse((x - 14, 110, x + 14, 124), fill=(255, 255, 255))
        draw.ellipse((x - 6, 111, x + 6, 123), fill=(50, 30, 20))
        draw.line((x - 16, 98, x + 14, 96), fill=(60, 40, 30), width=4)
    draw.polygon([(128, 125), (120, 160), (136, 160)], fill=(200, 150, 120))
    draw.chord((105, 170, 151, 190), 0, 180, fill=(180, 60, 70))
    draw.rectangle((40, 230, 216, 256), fill=(40, 40, 90))
    return image.filter(ImageFilter.GaussianBlur(2))


def _check_structure(detections, images):
    assert len(detections) == len(images)
    for found, image in zip(detections, images):
        for d in found:
            assert set(d) == {"class", "score", "box"} and d["class"] in NUDENET_LABELS
            assert 0.0 <= d["score"] <= 1.0 and d["score"] >= nudity.NUDENET_MIN_SCORE
            x, y, w, h = d["box"]
            assert all(isinstance(v, int) for v in d["box"])
            assert 0 <= x and 0 <= y and w >= 0 and h >= 0
            assert x + w <= image.width and y + h <= image.height


def test_nudenet_on_fixed_images(detector, tmp_path):
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photo = Image.open(handle).convert("RGB")
    images = [drawn_face(), photo, Image.new("RGB", (64, 48), (128, 128, 128))]
    found = detector.detect(images)
    _check_structure(found, images)
    assert [d["class"] for d in found[0]] == ["FACE_FEMALE"]
    assert any(d["class"] == "FACE_FEMALE" and d["score"] > 0.5 for d in found[1])
    assert found[2] == []
    assert found == detector.detect(images)  # deterministic
    assert nudity_figures(found, 0.0)["total"] == 0  # faces are not nudity
    # in memory, NudeNet sees what it reads from the PNG file
    images[0].save(tmp_path / "face.png")
    from_file = detector.detector.detect(str(tmp_path / "face.png"))
    assert [(d["class"], d["box"]) for d in from_file] == [(d["class"], d["box"]) for d in found[0]]
    assert [d["score"] for d in from_file] == pytest.approx([d["score"] for d in found[0]], abs=1e-6)
    described = detector.describe()
    assert described["model_file"] == "320n.onnx" and described["inference_resolution"] == 320
    assert described["nudenet"].startswith("3.4") and len(described["model_sha256"]) == 64


def test_nudenet_on_the_tiny_models_images(detector, sd1_dir):
    from emcid import load_model
    from emcid.core.generation import generate

    images = generate(load_model(sd1_dir), ["a photo of a beach"] * 2, [0, 1], progress=False)
    found = detector.detect(images)
    _check_structure(found, images)
    assert nudity_figures(found, 0.6)["images"] == 2


# --- the run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"threshold": 1.5}, r"threshold=1.5: give a finite number in \[0, 1\]"),
    ({"threshold": -0.1}, "threshold=-0.1"),
    ({"images": 0}, "images=0: give an integer >= 1"),
    ({"images": 9}, "9 images asked for"),
    ({"classes": ("NAKED",)}, "NudeNet labels"),
    ({"sampling_steps": 0}, "sampling_steps=0"),
    ({"options": {"stepz": 3}}, "stepz"),
    ({"model": "embedded:tasks"}, "no nudity concept"),
    ({"out": EXAMPLES / "i2p.csv"}, "would overwrite the data"),
    ({"requests_file": EXAMPLES / "debias.yaml"}, "holds debias requests"),
])
def test_bad_settings_are_refused_before_work(sd1_dir, tmp_path, monkeypatch, settings, message):
    monkeypatch.setattr("emcid.bench.i2p.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr("emcid.bench.i2p.NudityDetector", lambda *a, **k: pytest.fail("NudeNet loaded"))
    settings = {"model": sd1_dir, "out": tmp_path / "out", **settings}
    with pytest.raises(EmcidError, match=message):
        run_i2p(**{"data": EXAMPLES / "i2p.csv", "requests_file": EXAMPLES / "nudity.yaml", **settings},
                progress=False)
    assert not (tmp_path / "out").exists()


def test_bench_i2p_end_to_end(sd1_dir, fast_emcid, detector, tmp_path, capsys):
    from emcid.cli import main

    first = run_i2p(sd1_dir, EXAMPLES / "i2p.csv", EXAMPLES / "nudity.yaml", out=tmp_path / "lib",
                    options=fast_emcid, detector=detector, images=3, sampling_steps=2, threshold=0.5,
                    progress=False)
    argv = ["bench", "i2p", "--model", str(sd1_dir), "--data", str(EXAMPLES / "i2p.csv"), "--requests",
            str(EXAMPLES / "nudity.yaml"), "--images", "3", "--sampling-steps", "2", "--threshold", "0.5",
            "--out", str(tmp_path / "cli")]
    argv += [a for k, v in fast_emcid.items() for a in ("--option", f"{k}={v}")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "images with nudity" in printed and "FEMALE_BREAST_EXPOSED" in printed
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert saved["complete"] is True and saved["benchmark"] == "i2p" and saved["method"] == "emcid"
    settings = saved["settings"]
    assert settings["threshold"] == 0.5 and settings["classes"] == list(NUDITY_CLASSES)
    assert settings["images"] == 3 and settings["category"] == "sexual" and settings["sampling_steps"] == 2
    assert settings["seeds"] == [2539888340, 3058219921, 918274650]  # each row's sd_seed
    assert settings["guidance"] == [7.0, 7.0, 9.0]  # each row's sd_guidance_scale
    assert settings["image_sizes"] == [[16, 16]] * 3  # the model's size (no --row-size)
    assert saved["detector"]["model_file"] == "320n.onnx" and saved["requests"][0]["source"] == "nudity"
    for name in ("unedited", "edited"):
        figures = saved[name]
        assert figures["images"] == 3 and set(figures["detections"]) == set(NUDITY_CLASSES)
        assert figures["total"] == sum(figures["detections"].values())
        assert 0 <= figures["nude_fraction"] <= 1
        assert figures == nudity_figures([r["detections"][name] for r in saved["rows"]], 0.5)
    assert [r["line"] for r in saved["rows"]] == [2, 3, 5]
    for key in ("unedited", "edited", "rows", "settings", "model_fingerprint", "hparams"):
        assert saved[key] == json.loads(json.dumps(first[key])), key  # same command, same numbers
    report = (tmp_path / "cli" / "report.html").read_text()
    assert "FEMALE_BREAST_EXPOSED" in report and "images with nudity" in report
    assert (tmp_path / "cli" / saved["report"]["grids"]["i2p"]).is_file()
    assert "i2p, emcid: 3 prompts" in format_summary(saved)


def test_row_sizes_and_a_zero_count_from_the_command_line(sd1_dir, fast_emcid, detector, tmp_path, capsys):
    from emcid.cli import main

    data = _write(tmp_path, HEADER + "a sea,sexual,5,3,24,16,10\na lake,sexual,,,16,24,20\n")
    requests = EXAMPLES / "nudity.yaml"
    results = run_i2p(sd1_dir, data, requests, out=tmp_path / "out", options=fast_emcid, detector=detector,
                      row_size=True, seed=11, sampling_steps=1, grid=0, progress=False)
    settings = results["settings"]
    assert settings["image_sizes"] == [[16, 24], [24, 16]] and settings["seeds"] == [5, 12]
    assert settings["guidance"] == [3.0, 2.0]  # the row's, else the model's
    assert results["report"]["grids"] == {}
    bad = _write(tmp_path, HEADER + "a sea,sexual,5,3,20,16,10\n", "bad.csv")
    with pytest.raises(EmcidError, match="line 2: column 'sd_image_width' holds 20"):
        run_i2p(sd1_dir, bad, requests, out=tmp_path / "o2", row_size=True, progress=False)
    code = main(["bench", "i2p", "--model", str(sd1_dir), "--data", str(data), "--requests", str(requests),
                 "--images", "0", "--out", str(tmp_path / "o3")])
    assert code == 2 and "images=0" in capsys.readouterr().err and not (tmp_path / "o3").exists()
    code = main(["bench", "i2p", "--model", str(sd1_dir), "--data", str(data), "--requests", str(requests),
                 "--threshold", "2", "--out", str(tmp_path / "o3")])
    assert code == 2 and "threshold=2.0" in capsys.readouterr().err
