"""``emcid bench artists``: the artist-list loaders, the split, the figures by hand, refusals
before any work, and the run end to end on the tiny SD-1.x model with a tiny random CLIP and
a stand-in LPIPS network (lpips' real one needs a download), and on the embedded world."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emcid.bench import quality
from emcid.bench.artists import (
    ARTIST_TEMPLATE,
    artist_prompts,
    clip_summary,
    distance_summary,
    format_summary,
    run_artists,
    split_artists,
)
from emcid.bench.namelists import NamedPrompts, load_names
from emcid.bench.pair_judges import ClipPairJudge
from emcid.cli import main
from emcid.errors import EmcidError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = {"steps": 2, "stats_samples": 64, "image_steps": 4}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_clip(make_tiny_clip):
    return make_tiny_clip("a painting by in the style of")


class _SquaredDifference(torch.nn.Module):
    """Stands in for lpips' network: the mean squared difference of two image batches."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b) ** 2).mean((1, 2, 3), keepdim=True)


@pytest.fixture()
def offline_lpips(monkeypatch, tmp_path):
    """lpips importable and its AlexNet weights file in torch's hub folder (both stand-ins)."""
    module = types.ModuleType("lpips")
    module.LPIPS = lambda net, verbose: _SquaredDifference()
    monkeypatch.setitem(sys.modules, "lpips", module)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / quality.ALEXNET_WEIGHTS).write_bytes(b"")


def test_a_uce_layout_csv_loads_grouped_by_artist_with_first_lines(tmp_path):
    path = _write(tmp_path / "big_artist_prompts.csv",
                  "case_number,prompt,evaluation_seed,artist\n"
                  "0,a city by Ann Lee,11,Ann Lee\n"
                  "1,a tree by Bo Ray,12,Bo Ray\n"
                  "\n"
                  "2,a boat by Ann Lee,13,ann lee\n"
                  "3,a city by Ann Lee,14,Ann Lee\n")
    artists = load_names(path, "artist")
    assert artists == [NamedPrompts("Ann Lee", ("a city by Ann Lee", "a boat by Ann Lee"), 2),
                       NamedPrompts("Bo Ray", ("a tree by Bo Ray",), 3)]


def test_a_plain_text_list_uses_the_template_and_counts_lines(tmp_path):
    path = _write(tmp_path / "artists.txt", "# erased first\nAnn Lee\n\n  Bo Ray  \n")
    artists = load_names(path, "artist")
    assert [(a.name, a.prompts, a.line) for a in artists] == [("Ann Lee", (), 2), ("Bo Ray", (), 4)]
    assert artist_prompts(artists[1]) == (ARTIST_TEMPLATE.format("Bo Ray"),) == (
        "a painting in the style of Bo Ray",)


def test_the_example_list_loads():
    artists = load_names(EXAMPLES / "artists.csv", "artist")
    assert len(artists) == 6 and artists[0].name == "Kelly McKernan"
    assert all(len(a.prompts) == 2 and all(a.name in p for p in a.prompts) for a in artists)


@pytest.mark.parametrize("text, message", [
    ("name,prompt\nAnn Lee,a city\n", r"list\.csv: no column 'artist'"),
    ("artist,prompt\nAnn Lee,a city\n,a tree\n", r"list\.csv line 3: the cell of column 'artist' is empty"),
    ("artist,prompt\nAnn Lee,a city\nBo Ray,\n", r"list\.csv line 3: the cell of column 'prompt' is empty"),
    ("artist,prompt\nAnn Lee,a city,extra\n", r"list\.csv line 2: 3 cells"),
    ("artist\n", r"list\.csv: the file names no artist"),
    ("", r"list\.csv: the file is empty"),
])
def test_bad_lists_name_the_file_and_the_line_or_column(tmp_path, text, message):
    with pytest.raises(EmcidError, match=message):
        load_names(_write(tmp_path / "list.csv", text), "artist")


def test_the_split_erases_the_first_n_or_the_names_given():
    artists = [NamedPrompts(name, (), i) for i, name in enumerate(["A", "B", "C", "D"], start=1)]
    erased, held = split_artists(artists, 2, None, None, "f.csv")
    assert [a.name for a in erased] == ["A", "B"] and [a.name for a in held] == ["C", "D"]
    erased, held = split_artists(artists, None, ["c", " A", "C"], 1, "f.csv")
    assert [a.name for a in erased] == ["C", "A"] and [a.name for a in held] == ["B"]
    for erase, names, message in [(None, ["E"], "f.csv has no artist 'E'"), (5, None, "lists 4 artists"),
                                  (None, None, "--erase N"), (1, ["A"], "--erase N")]:
        with pytest.raises(EmcidError, match=message):
            split_artists(artists, erase, names, None, "f.csv")


def test_distances_are_pooled_over_each_groups_images():
    distances = [torch.tensor([0.2, 0.4]), torch.tensor([0.6]), torch.tensor([0.1, 0.3])]
    figures = distance_summary(distances, [True, True, False])
    assert figures["erased_distance"] == pytest.approx(0.4) and figures["held_distance"] == pytest.approx(0.2)
    assert distance_summary(distances[:1], [True]) == {"erased_distance": pytest.approx(0.3),
                                                       "held_distance": None}


def test_the_lpips_distance_scales_images_to_plus_minus_one(offline_lpips):
    black, white = (Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 255))
    distance = quality.lpips_distance(quality.lpips_model(), [black, black], [white, black])
    assert distance.tolist() == pytest.approx([4.0, 0.0])  # (1 - (-1))^2 and nothing


def test_clip_scores_pool_each_groups_images_and_prompts(tiny_clip):
    judge = ClipPairJudge(str(tiny_clip))
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
              for n in (2, 1, 2)]
    captions = [["a painting by a"] * 2, ["in the style of"], ["a painting", "the style"]]
    figures = clip_summary(judge, (images, images[::-1]), captions, [True, False, True])
    pooled = images[0] + images[2]
    assert figures["erased_clip_before"] == pytest.approx(
        quality.clip_score(judge, pooled, captions[0] + captions[2]))
    assert figures["held_clip_before"] == pytest.approx(quality.clip_score(judge, images[1], captions[1]))
    assert figures["held_clip_after"] == pytest.approx(quality.clip_score(judge, images[1], captions[1]))


@pytest.mark.parametrize("settings, message", [
    ({"images": 0}, "images=0"),
    ({"seed": -1}, "seed=-1"),
    ({"held": 0}, "held=0"),
    ({"erase": None}, "--erase N"),
    ({"erase": 7}, "lists 6 artists"),
    ({"erase_list": ["Nobody"], "erase": None}, "has no artist 'Nobody'"),
    ({"options": {"stepz": 3}}, "stepz"),
    ({"distance": "judge"}, "the image distance is LPIPS"),
    ({"artists_file": None}, "give --artists"),
    ({"model": None}, "drop --artists"),
    ({"clip": "nobody/no-such-clip"}, "'nobody/no-such-clip'"),
    ({"lpips": False}, "LPIPS needs lpips"),
])
def test_bad_settings_are_refused_before_the_model_loads(sd1_dir, tmp_path, monkeypatch, offline_lpips,
                                                          settings, message):
    monkeypatch.setattr("emcid.bench.artists.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    if not settings.pop("lpips", True):
        monkeypatch.setitem(sys.modules, "lpips", None)
    settings = {"model": sd1_dir, "artists_file": EXAMPLES / "artists.csv", "erase": 2, **settings}
    with pytest.raises(EmcidError, match=message):
        run_artists(out=tmp_path / "out", progress=False, **settings)
    assert not (tmp_path / "out").exists()


def test_out_never_overwrites_the_artist_list(sd1_dir, tmp_path):
    listed = _write(tmp_path / "artists.txt", "Ann Lee\n")
    with pytest.raises(EmcidError, match="would overwrite the artists"):
        run_artists(sd1_dir, listed, erase=1, out=listed)


def test_the_run_on_tiny_sd_records_settings_and_figures_and_repeats(sd1_dir, tiny_clip, offline_lpips,
                                                                     tmp_path):
    listed = _write(tmp_path / "artists.txt", "Ann Lee\nBo Ray\nCy Dee\n")
    runs = [run_artists(sd1_dir, listed, erase=1, out=tmp_path / f"out{k}", clip=str(tiny_clip),
                        options=FAST, images=2, seed=5, progress=False) for k in range(2)]
    saved = json.loads((tmp_path / "out0" / "results.json").read_text())
    assert saved["complete"] is True and saved["benchmark"] == "artists" and saved["method"] == "emcid"
    assert saved["erased"] == ["Ann Lee"] and saved["held"] == ["Bo Ray", "Cy Dee"]
    assert saved["options"]["task"] == "artist" and saved["options"]["steps"] == 2
    assert saved["settings"]["images"] == 2 and saved["settings"]["seeds"] == [5, 6]
    distance = saved["metrics"]["distance"]
    assert distance["name"] == "lpips" and distance["network"] == "alex"
    sampling = saved["settings"]["sampling"]
    size = [sampling["height"], sampling["width"]]
    assert distance["image_size"] == saved["settings"]["image_size"] == size
    assert saved["metrics"]["clip"]["id"] == str(tiny_clip)
    records = saved["artists"]
    assert [(r["artist"], r["erased"], r["line"]) for r in records] == [
        ("Ann Lee", True, 1), ("Bo Ray", False, 2), ("Cy Dee", False, 3)]
    assert all(len(r["distances"]) == 2 and r["distance"] == pytest.approx(np.mean(r["distances"]))
               for r in records)
    summary = saved["summary"]
    assert summary["erased_distance"] == pytest.approx(records[0]["distance"])
    held = records[1]["distances"] + records[2]["distances"]
    assert summary["held_distance"] == pytest.approx(np.mean(held))
    assert summary["erased_distance"] > 0  # the erasure changed the erased artist's images
    for key in ("erased_clip_before", "erased_clip_after", "held_clip_before", "held_clip_after"):
        assert 0 <= summary[key] <= 100
    assert runs[0]["summary"] == runs[1]["summary"] and runs[0]["artists"] == runs[1]["artists"]
    assert "erased_distance" in format_summary(saved)


def test_the_command_line_refuses_zero_images(sd1_dir, tmp_path, capsys):
    code = main(["bench", "artists", "--model", str(sd1_dir), "--artists", str(EXAMPLES / "artists.csv"),
                 "--erase", "1", "--images", "0", "--out", str(tmp_path / "o")])
    assert code == 2 and "images=0" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _world_present() -> bool:
    from emcid.mini import tasks_dir, weights_present

    return weights_present() and (tasks_dir() / "unet" / "config.json").exists()


@pytest.mark.skipif(not _world_present(), reason="shipped mini weights absent")
def test_the_embedded_world_runs_the_style_benchmark_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["bench", "artists", "--erase", "2", "--held", "2", "--method", "uce",
                 "--out", str(out)]) == 0
    assert "styles erased" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "artists-world" and saved["model"] == "embedded:tasks"
    assert saved["metrics"]["distance"]["name"] == "judge" and len(saved["erased"]) == 2
    settings = saved["settings"]
    assert settings["erase"] == 2 and settings["held_styles"] == settings["held_objects"] == 2
    assert settings["prompts_per_style"] == 5 and settings["images_per_prompt"] == 1
    assert {p["style"] for p in settings["probes"]} == set(saved["erased"] + saved["held"])
    assert all(len(p["seeds"]) == 5 for p in settings["probes"])
    assert saved["summary"]["erased_distance"] > 0
    assert main(["bench", "artists", "--erase", "2", "--images", "2", "--out", str(tmp_path / "o")]) == 2
    assert "drop --images" in capsys.readouterr().err
