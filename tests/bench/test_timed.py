"""TIMED / RoAD single edits: the loaders, the metric arithmetic, the world's rows, and the run
end to end on the tiny model with a tiny random CLIP judge saved locally (nothing downloads)."""

import json
from pathlib import Path

import pytest
import torch

from emcid.bench.pair_judges import ClipPairJudge, WorldPairJudge
from emcid.bench.timed import ROAD, TIMED, load_rows, mean_figures, row_figures
from emcid.bench.timed_run import format_summary, run_timed
from emcid.bench.timed_world import world_rows
from emcid.errors import BenchmarkError, OptionError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMED_HEADER = "old,new,positive1,gt1,positive2,gt2,negative1,gn1\n"


def _write(tmp_path, text, name="rows.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_clip(make_tiny_clip):
    return make_tiny_clip("a an the rose blue tulip lion tiger king jungle")


# --- loaders --------------------------------------------------------------------------------


def test_example_files_load_in_their_layouts():
    timed = load_rows(EXAMPLES / "timed.csv", TIMED, seed=3)
    assert len(timed) == 3 and timed[0].line == 2
    first = timed[0]
    assert (first.request.source, first.request.destination) == ("rose", "blue rose")
    assert first.request.prompts[0] == "A {}" and first.request.seed == 3
    assert (first.efficacy[0].prompt, first.efficacy[0].destination) == ("A rose", "A blue rose")
    assert len(first.positives) == 5 and len(first.negatives) == 5
    assert first.negatives[0].prompt == first.negatives[0].source == "A tulip"
    fox = timed[2]  # "A fox" -> "An arctic fox": the article is the template's, not the subject's
    assert (fox.request.source, fox.request.destination) == ("fox", "arctic fox")
    road = load_rows(EXAMPLES / "road.csv", "road")
    assert len(road) == 2
    lion = road[0]
    assert (lion.request.source, lion.request.destination) == ("The king of the jungle", "A tiger")
    assert lion.efficacy[0].source == "A lion"  # RoAD judges the prompt's image by Old and New
    positive = lion.positives[0]
    assert (positive.source, positive.destination) == ("A lion sleeping", "A tiger sleeping")


def test_missing_column_names_it_and_the_file(tmp_path):
    path = _write(tmp_path, "old,new,positive1,negative1,gn1\n"
                            "A rose,A blue rose,A bush,A tulip,A blue tulip\n")
    with pytest.raises(BenchmarkError, match=r"rows\.csv: no column 'gt1'"):
        load_rows(path, TIMED)
    with pytest.raises(BenchmarkError, match="this looks like a RoAD file"):
        load_rows(EXAMPLES / "road.csv", TIMED)
    with pytest.raises(BenchmarkError, match="no column 'prompt'; this looks like a TIMED file"):
        load_rows(EXAMPLES / "timed.csv", ROAD)


def test_empty_files_are_refused(tmp_path):
    with pytest.raises(BenchmarkError, match="the file is empty"):
        load_rows(_write(tmp_path, ""), TIMED)
    with pytest.raises(BenchmarkError, match="a header but no rows"):
        load_rows(_write(tmp_path, TIMED_HEADER + "\n"), TIMED)


@pytest.mark.parametrize("bad_line, message", [
    ("A rose,A blue rose,A bush,A blue bush,A vase,,A tulip,A blue tulip",
     "line 3: the cell of column 'gt2' is empty"),
    ("A rose,A blue rose,A bush,A blue bush,A vase,A blue vase,A tulip",
     "line 3: 7 cells, but the header has 8"),
    ("A rose,A rose,A bush,A blue bush,A vase,A blue vase,A tulip,A blue tulip",
     "line 3: source and destination"),
])
def test_a_bad_row_names_its_line(tmp_path, bad_line, message):
    good = "A cat,A green cat,A kitten,A green kitten,A cat toy,A green cat toy,A dog,A green dog\n"
    path = _write(tmp_path, TIMED_HEADER + good + bad_line + "\n")
    with pytest.raises(BenchmarkError, match=message):
        load_rows(path, TIMED)


# --- metrics --------------------------------------------------------------------------------


def test_row_figures_by_hand():
    efficacy = torch.tensor([[0.9, 0.4]])  # one of two images above 0.5
    positives = torch.tensor([[0.8, 0.95], [0.5, 0.76]])  # 0.5 is not above: 3 of 4
    negatives = torch.tensor([[0.1, 0.6], [0.2, 0.5]])  # 0.5 is not below: 2 of 4 keep the source
    figures = row_figures(efficacy, positives, negatives, (0.75, 0.9))
    assert figures["efficacy"] == 0.5
    assert figures["generality"] == 0.75
    assert figures["specificity"] == 0.5
    assert figures["generality_at"] == {"0.75": 0.75, "0.9": 0.25}
    assert figures["mean_p_destination"]["generality"] == pytest.approx(3.01 / 4)
    other = row_figures(torch.tensor([0.7]), torch.tensor([0.2]), torch.tensor([0.3]), (0.75, 0.9))
    mean = mean_figures([figures, other])  # every row weighs the same, whatever its image count
    assert mean["efficacy"] == 0.75 and mean["generality"] == 0.375 and mean["specificity"] == 0.75
    assert mean["generality_at"]["0.75"] == 0.375


class FixedJudge:
    """TEST ONLY: P(destination) by the destination text, whatever the image shows."""

    values = {"A blue rose": 0.9, "A bush of blue roses": 0.6, "A blue vase of roses": 0.3,
              "A blue tulip": 0.2, "A blue daisy": 0.7}

    def destination_proba(self, images, pairs):
        return torch.tensor([self.values[d] for _, d in pairs])

    def describe(self):
        return {"kind": "fixed"}


def test_run_figures_from_fixed_judge_outputs(sd1_dir, fast_emcid, tmp_path):
    data = _write(tmp_path, "old,new,positive1,gt1,positive2,gt2,negative1,gn1,negative2,gn2\n"
                  "A rose,A blue rose,A bush of roses,A bush of blue roses,A vase of roses,"
                  "A blue vase of roses,A tulip,A blue tulip,A daisy,A blue daisy\n")
    results = run_timed(sd1_dir, data, out=tmp_path / "out", judge=FixedJudge(), options=fast_emcid,
                        images=2, progress=False)
    # efficacy 0.9 > 0.5; positives 0.6 yes, 0.3 no; negatives 0.2 keeps the source, 0.7 does not
    for name in ("edited", "unedited"):
        assert results["summary"][name]["efficacy"] == 1.0
        assert results["summary"][name]["generality"] == 0.5
        assert results["summary"][name]["specificity"] == 0.5
        assert results["summary"][name]["generality_at"] == {"0.75": 0.0, "0.9": 0.0}
    positives = results["rows"][0]["p_destination"]["edited"]["positives"]
    assert torch.allclose(torch.tensor(positives), torch.tensor([[0.6, 0.6], [0.3, 0.3]]))


# --- the world ------------------------------------------------------------------------------


def test_world_rows_are_seeded_colour_edits_with_visible_negatives():
    from emcid.mini import styles, world

    rows = world_rows(10, seed=0)
    assert len(rows) == 10 and rows == world_rows(10, seed=0) and rows != world_rows(10, seed=1)
    concepts = {c.name: c for c in world.load_concepts()}
    for row in rows:
        source = concepts[row.request.source]
        word, _, name = row.request.destination.partition(" ")
        colour = styles.style_colour(word)
        assert name == source.name and word in styles.COLOUR_WORDS and colour != source.bg
        assert [p.prompt for p in row.positives] == [p for p, _ in world.free_form_prompts(source)]
        assert len(row.efficacy) == 3 and len(row.negatives) == 5
        for probe in row.negatives:
            other = concepts[probe.source]
            assert other.shape == source.shape and other.bg != colour and styles.can_draw_on(other, colour)
            assert probe.destination == f"{word} {other.name}"


def test_world_judge_reads_the_colour_each_text_names():
    from emcid.mini import styles, world

    tench = world.load_concepts()[0]
    teal = styles.style_colour("teal")
    third = next(c for c in range(len(world.PALETTE))
                 if c not in (teal, tench.bg) and styles.can_draw_on(tench, c))
    judge = WorldPairJudge()
    images = [styles.render_on(tench, teal, seed=1), world.render(tench.index, 1),
              styles.render_on(tench, third, seed=1)]
    proba = judge.destination_proba(images, [(tench.name, f"teal {tench.name}")] * 3)
    assert proba[0] > 0.9 and proba[1] < 0.1
    assert proba[2] == 0.5  # drawn on neither colour: it shows neither side
    with pytest.raises(BenchmarkError, match="cannot read"):
        judge.colour("not a concept of the world")


# --- the run end to end on the tiny model ---------------------------------------------------


def test_clip_judge_prefers_the_text_it_scores_higher(tiny_clip):
    from PIL import Image

    judge = ClipPairJudge(str(tiny_clip), batch_size=2)
    images = [Image.new("RGB", (40, 24), (200, 10, 10)), Image.new("RGB", (16, 16), (10, 10, 200))] * 2
    pairs = [("A rose", "A blue rose"), ("A tulip", "A blue tulip"),
             ("A blue rose", "A rose"), ("A blue tulip", "A tulip")]
    proba = judge.destination_proba(images, pairs)
    assert proba.shape == (4,)
    assert torch.allclose(proba[:2] + proba[2:], torch.ones(2), atol=1e-5)  # swapping texts: 1 - P
    assert judge.describe()["image_size"] == 32


def test_a_missing_clip_judge_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchmarkError) as caught:
        ClipPairJudge("nobody/no-such-clip")
    message = str(caught.value)
    assert "'nobody/no-such-clip'" in message and "never download" in message and "\n" not in message


def test_timed_end_to_end_records_settings_and_repeats(sd1_dir, tiny_clip, fast_emcid, tmp_path):
    data = _write(tmp_path, (EXAMPLES / "timed.csv").read_text().splitlines(True)[0]
                  + (EXAMPLES / "timed.csv").read_text().splitlines(True)[1])
    runs = [run_timed(sd1_dir, data, out=tmp_path / f"out{k}", judge=str(tiny_clip), options=fast_emcid,
                      images=1, seed=5, progress=False) for k in range(2)]
    saved = json.loads((tmp_path / "out0" / "results.json").read_text())
    assert saved["complete"] is True and saved["benchmark"] == "TIMED"
    assert saved["judge"]["id"] == str(tiny_clip) and saved["judge"]["image_size"] == 32
    assert saved["settings"]["images"] == 1 and saved["settings"]["seeds"] == [5]
    assert saved["settings"]["image_size"] == [16, 16] and saved["method"] == "emcid"
    assert saved["options"] == fast_emcid and saved["hparams"]["stage1"]["steps"] == 2
    row = saved["rows"][0]
    assert (row["source"], row["destination"]) == ("rose", "blue rose")
    assert len(row["p_destination"]["edited"]["positives"]) == 5
    for name in ("edited", "unedited"):
        assert all(0 <= saved["summary"][name][k] <= 1 for k in ("efficacy", "generality", "specificity"))
    assert runs[0]["rows"] == runs[1]["rows"] and runs[0]["summary"] == runs[1]["summary"]
    assert "efficacy" in format_summary(saved) and "generality>0.9" in format_summary(saved)


def test_road_from_the_command_line(sd1_dir, tiny_clip, tmp_path, capsys):
    from emcid.cli import main

    data = _write(tmp_path, "".join((EXAMPLES / "road.csv").read_text().splitlines(True)[:2]))
    code = main(["bench", "road", "--data", str(data), "--model", str(sd1_dir), "--judge", str(tiny_clip),
                 "--images", "1", "--no-unedited", "--out", str(tmp_path / "road"),
                 "--option", "steps=2", "--option", "stats_samples=64", "--option", "image_steps=4"])
    assert code == 0
    saved = json.loads((tmp_path / "road" / "results.json").read_text())
    assert saved["benchmark"] == "RoAD" and saved["options"]["steps"] == 2
    assert list(saved["summary"]) == ["edited"] and saved["rows"][0]["unedited"] is None
    assert "RoAD, emcid: 1 single edits" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "images=0"),
    (["--thresholds", "0.75,1.5"], "threshold=1.5"),
    (["--option", "steps=-1"], "steps"),
])
def test_bad_settings_are_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    import emcid.bench.timed_run as timed_run
    from emcid.cli import main

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(timed_run, "load_model", no_work)
    monkeypatch.setattr(timed_run, "world_rows", no_work)
    assert main(["bench", "timed", "--out", str(tmp_path / "out"), *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_rows_need_a_matching_model(tmp_path, monkeypatch):
    with pytest.raises(BenchmarkError, match="give --model"):
        run_timed(None, EXAMPLES / "timed.csv", out=tmp_path / "out")
    with pytest.raises(BenchmarkError, match="give a data file"):
        run_timed(None, None, layout="road", out=tmp_path / "out")
    with pytest.raises(OptionError):
        run_timed(None, None, out=tmp_path / "out", images=0)
