"""General-quality metrics (FID, CLIP score, the judge distance) and ``emcid bench coco``."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from emcid.bench import quality
from emcid.bench.coco import format_summary, run_coco
from emcid.bench.pair_judges import ClipPairJudge
from emcid.errors import EmcidError

WORDS = "a an the photo of dog cat on grass red car street".split()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP (text and vision towers) with a tokenizer, saved like a real one."""
    from emcid.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"), WORDS)


def _images(count: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _closed_form_fid(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2), by eigendecompositions."""
    def sqrt_psd(m):
        values, vectors = np.linalg.eigh(m)
        return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T

    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = sqrt_psd(sx)
    cross = np.trace(sqrt_psd(root @ sy @ root))
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * cross)


def test_fid_of_identical_sets_is_zero():
    features = torch.from_numpy(np.random.default_rng(0).normal(size=(50, 4)))
    assert quality.frechet_distance(features, features.clone()) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_two_gaussian_sets_matches_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.multivariate_normal([0, 0, 0], [[1, 0.3, 0], [0.3, 2, 0], [0, 0, 0.5]], size=400)
    y = rng.multivariate_normal([1, -1, 0.5], [[2, 0, 0.2], [0, 1, 0], [0.2, 0, 1]], size=300)
    fid = quality.frechet_distance(torch.from_numpy(x), torch.from_numpy(y))
    assert fid == pytest.approx(_closed_form_fid(x, y), rel=1e-6)
    assert fid > 2.0  # the means alone differ by 2.25


def test_fid_needs_two_images_per_set():
    with pytest.raises(EmcidError, match="at least 2"):
        quality.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_clip_score_matches_the_formula(tiny_clip):
    judge = ClipPairJudge(str(tiny_clip))
    images, captions = _images(3, 2), ["a photo of dog", "a red car on the street", "the cat on grass"]
    with torch.no_grad():
        tokens = judge.tokenizer(captions, padding=True, return_tensors="pt")
        text = judge.model.get_text_features(**tokens).pooler_output
        image = judge.model.get_image_features(pixel_values=judge._pixels(images)).pooler_output
    cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    expected = max(100 * float(cos.mean()), 0.0)
    assert quality.clip_score(judge, images, captions) == pytest.approx(expected, abs=1e-4)


def test_clip_image_features_are_the_projected_embeddings(tiny_clip):
    judge = ClipPairJudge(str(tiny_clip))
    assert quality.clip_image_features(judge, _images(5, 3), batch_size=2).shape == (5, 16)


def test_judge_distance_by_hand():
    from emcid.mini.judge import load_judge

    judge = load_judge()
    before, after = _images(2, 4), _images(2, 5)
    distance = quality.judge_distance(judge, before, after)
    expected = np.zeros(2)
    for a, b in zip(quality.judge_activations(judge, before), quality.judge_activations(judge, after)):
        a, b = a.numpy(), b.numpy()
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        expected += ((a - b) ** 2).sum(1).mean((1, 2))
    assert np.allclose(distance.numpy(), expected, rtol=1e-5)
    assert (distance > 0).all()
    assert torch.allclose(quality.judge_distance(judge, before, before), torch.zeros(2), atol=1e-6)
    assert quality.judge_features(judge, before).shape == (2, 64)


def test_lpips_without_lpips_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips raises ImportError
    with pytest.raises(EmcidError, match="LPIPS needs lpips and a torchvision"):
        quality.lpips_model()


def test_lpips_without_its_weights_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", types.ModuleType("lpips"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(EmcidError, match=quality.ALEXNET_WEIGHTS):
        quality.lpips_model()


def _coco_files(tmp_path):
    captions = {"annotations": [{"image_id": i, "id": i, "caption": text} for i, text in enumerate(
        ["a photo of dog", "a red car on the street", "the cat on grass", "a dog on grass",
         "a cat", "the red car"])]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(captions))
    (tmp_path / "requests.yaml").write_text("- source: dog\n  destination: cat\n")
    return tmp_path / "captions_val2017.json", tmp_path / "requests.yaml"


def test_coco_end_to_end_records_settings_and_repeats(sd1_dir, tiny_clip, fast_emcid, tmp_path):
    captions, requests = _coco_files(tmp_path)
    runs = [run_coco(sd1_dir, captions, requests, out=tmp_path / f"out{k}", judge=str(tiny_clip),
                     options=fast_emcid, captions=4, seed=3, progress=False) for k in range(2)]
    saved = json.loads((tmp_path / "out0" / "results.json").read_text())
    assert saved["complete"] is True and saved["benchmark"] == "coco"
    assert saved["settings"]["captions"] == 4 and saved["settings"]["seeds"] == [3, 4, 5, 6]
    assert saved["metrics"]["judge"]["id"] == str(tiny_clip) and saved["metrics"]["image_size"] == 32
    assert "CLIP image embeddings" in saved["metrics"]["fid_features"]
    assert len(saved["captions"]) == 4 and saved["fid"] >= 0
    assert 0 <= saved["unedited"]["clip_score"] <= 100 and 0 <= saved["edited"]["clip_score"] <= 100
    for key in ("fid", "unedited", "edited", "captions"):
        assert runs[0][key] == runs[1][key]
    assert "FID" in format_summary(saved) and "clip_score" in format_summary(saved)


@pytest.mark.parametrize("settings, message", [
    ({"captions": 0}, "captions=0"),
    ({"captions_file": "missing.json"}, "not a file"),
    ({"captions": 7}, "only 6 are available"),
    ({"options": {"stepz": 3}}, "stepz"),
])
def test_coco_bad_settings_are_refused_before_work(sd1_dir, tmp_path, settings, message, monkeypatch):
    captions, requests = _coco_files(tmp_path)
    settings = {"captions_file": captions, **settings}
    monkeypatch.setattr("emcid.bench.coco.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(EmcidError, match=message):
        run_coco(sd1_dir, requests_file=requests, out=tmp_path / "out", progress=False, **settings)


def test_coco_from_the_command_line(sd1_dir, tiny_clip, tmp_path, capsys):
    from emcid.cli import main

    captions, requests = _coco_files(tmp_path)
    code = main(["bench", "coco", "--model", str(sd1_dir), "--captions", str(captions), "--requests",
                 str(requests), "--judge", str(tiny_clip), "--images", "0", "--out", str(tmp_path / "o")])
    assert code == 2 and "captions=0" in capsys.readouterr().err


def test_world_captions_are_held_out_prompts_of_untouched_concepts():
    from emcid.bench.coco import world_captions
    from emcid.mini import world
    from emcid.requests.edit import EditRequest

    concepts = world.load_concepts()
    requests = [EditRequest(concepts[0].name, concepts[1500].name)]
    chosen = world_captions(requests, 30, seed=1)
    assert chosen == world_captions(requests, 30, seed=1) != world_captions(requests, 30, seed=2)
    assert {index for _, index in chosen}.isdisjoint({0, 1500}) and len(set(chosen)) == 30
    for prompt, index in chosen:
        assert prompt in [p for p, _ in world.free_form_prompts(concepts[index])]


def test_style_distance_figures_leave_grey_styles_out():
    from emcid.bench.styles import StyleProbe, distance_figures
    from emcid.mini import styles, world

    grey = styles.colour_index(world.NEUTRAL_COLOUR)
    probes = [StyleProbe("a", 3, ("p", "q"), (0, 1)), StyleProbe("b", grey, ("p", "q"), (0, 1))]
    before, after = [[1, 2], [3, 4]], [[2, 2], [9, 9]]

    def distance(x, y):  # stands in for an image distance on numbers
        return torch.tensor([abs(a - b) for a, b in zip(x, y)], dtype=torch.float)

    figures = distance_figures(distance, (before, after), (before, after), probes, probes[1:])
    assert figures == {"erased_distance": 0.5, "held_distance": None}


def test_coco_refuses_debias_requests_and_captions_on_the_embedded_model(tiny_clip, tmp_path):
    from emcid.mini import default_model_dir

    captions, _ = _coco_files(tmp_path)
    debias = tmp_path / "debias.yaml"
    debias.write_text("- source: doctor\n  debias: [male, female]\n")
    with pytest.raises(EmcidError, match="debias requests"):
        run_coco("tiny-sd", captions, debias, out=tmp_path / "out", captions=4, progress=False)
    with pytest.raises(EmcidError, match="is the embedded model: drop --captions"):
        run_coco(default_model_dir(), captions, tmp_path / "requests.yaml", out=tmp_path / "out",
                 judge=str(tiny_clip), captions=4, progress=False)
