"""``embedded:tasks`` (the embedded model that also draws styles and colour words): loading,
what it draws, debias on the world, the style benchmark's split and its sweep, all judged by
the world's judge."""

from __future__ import annotations

import pytest
import torch

import emcid
from emcid.bench import styles as bench
from emcid.core.family import EMBEDDED_TASKS
from emcid.core.generation import generate_arrays, to_pil
from emcid.mini import styles, tasks_dir, weights_present, world
from emcid.tasks.debias import balance_gap

pytestmark = pytest.mark.skipif(not (weights_present() and (tasks_dir() / "unet" / "config.json").exists()),
                                reason="shipped mini weights absent")
FAST = {"stats_samples": 1000}


@pytest.fixture(scope="module")
def tasks_bundle():
    return emcid.load_model(EMBEDDED_TASKS)


@pytest.fixture(scope="module")
def judge():
    from emcid.mini.judge import load_judge

    return load_judge()


def test_the_tasks_model_shares_the_vae_and_the_edited_layers_shape_with_the_embedded_one(tasks_bundle):
    plain = emcid.load_model()
    assert tasks_bundle.is_embedded and tasks_bundle.settings["tasks"] == ["styles", "colour_words"]
    assert not plain.settings.get("tasks")
    assert tasks_bundle.source == "embedded:tasks"
    assert tasks_bundle.fingerprint(("vae",)) == plain.fingerprint(("vae",))
    # its own encoder (fine-tuned for styles) and UNet, of the default's shapes
    for part in ("text_encoder", "unet"):
        assert tasks_bundle.fingerprint((part,)) != plain.fingerprint((part,))
        ours, theirs = getattr(tasks_bundle.pipeline, part), getattr(plain.pipeline, part)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()}


def test_the_tasks_models_statistics_hold_its_task_prompts(tasks_bundle):
    """The style prompts' keys are preserved like any caption's (docs/mini.md); the default model
    keeps the world's own captions."""
    from emcid.core.stats import default_corpus

    assert default_corpus(tasks_bundle, 300) == styles.tasks_caption_corpus(300)
    assert default_corpus(emcid.load_model(), 300) == world.caption_corpus(300)


def test_the_style_split_is_seeded_and_disjoint():
    split = bench.style_split(seed=0)
    assert split == bench.style_split(seed=0) and split != bench.style_split(seed=1)
    assert len(split.artists) == 1000 and len(split.held_styles) == 100 and len(split.held_objects) == 100
    by_name = {c.name: c for c in world.load_concepts()}
    assert all(by_name[s].split == "extra" for s in split.artists)
    assert all(by_name[s].split == "imagenet1k" for s in split.held_styles)
    assert all(world.load_concepts()[i].split == "imagenet1k" for i in split.held_objects)
    assert not {by_name[s].index for s in split.held_styles} & set(split.held_objects)
    probe = bench.style_probe(split.artists[0])
    assert probe.prompts[:3] == tuple(t.format(split.artists[0]) for t in styles.STYLE_PROMPTS)
    assert all(p.endswith(f" in the style of {split.artists[0]}") for p in probe.prompts[3:])


def test_the_tasks_model_draws_colour_words_and_the_default_one_does_not(tasks_bundle, judge):
    requests = bench.colour_debias_requests(8, seed=3)
    prompts = [f"An image of {d}" for r in requests for d in r.destinations()]
    wanted = torch.tensor([styles.colour_of_phrase(p) for p in prompts])

    def hits(bundle):
        images = to_pil(generate_arrays(bundle, prompts, list(range(len(prompts))), progress=False))
        return (judge.background_proba(images).argmax(1) == wanted).float().mean()

    assert hits(tasks_bundle) >= 0.75
    assert hits(emcid.load_model()) <= 0.6  # the default model draws each object on its own colour


def test_the_tasks_model_draws_styles_and_the_default_one_hardly(tasks_bundle, judge):
    """Shares of images on the style's colour: the release's artist prompts alone, and
    "An image of Y in the style of X" (measured 0.95 / 0.575 against 0.52 / 0.075; docs/mini.md)."""
    probes = [bench.style_probe(style) for style in bench.style_split().held_styles[:20]]
    alone = len(styles.STYLE_PROMPTS)

    def shares(bundle):
        found = bench.found_colours(bundle, judge, probes)
        return bench.kept_share(found[:, :alone], probes), bench.kept_share(found[:, alone:], probes)

    tasks_alone, tasks_styled = shares(tasks_bundle)
    default_alone, default_styled = shares(emcid.load_model())
    assert tasks_alone >= 0.85 and default_alone <= 0.65
    assert tasks_styled >= 0.45 and default_styled <= 0.15


def test_a_style_sweep_edits_each_scale_from_the_unedited_model_and_restores_it(tasks_bundle, judge):
    base = tasks_bundle.fingerprint()
    results = bench.run_style_sweep(tasks_bundle, judge, [2, 1], held_styles=20, held_objects=20,
                                    singles=2, progress=False, **FAST)
    assert sorted(results) == [1, 2] and tasks_bundle.fingerprint() == base
    for figures in results.values():  # the artist presets leave the rest of the world alone
        assert figures["other_styles_delta"] > -0.15 and figures["objects_delta"] > -0.15
        assert figures["erased_distance"] > figures["held_distance"] >= 0  # erased styles change most
    singles = results[1]["singles"]  # scale 1: each of the first two artists alone, averaged
    assert [s["style"] for s in singles] == bench.style_split().artists[:2]
    assert results[1]["efficacy"] == pytest.approx(sum(s["efficacy"] for s in singles) / 2)
    with pytest.raises(emcid.errors.OptionError, match="between 1 and 1000"):
        bench.run_style_sweep(tasks_bundle, judge, [1001])
    with pytest.raises(emcid.errors.OptionError, match="singles"):
        bench.run_style_sweep(tasks_bundle, judge, [1], singles=0)


def test_styles_drawn_on_grey_are_left_out_of_the_erasure_figures():
    """Erasing to the neutral concept cannot show on a style whose colour is its grey."""
    grey = styles.colour_index(world.NEUTRAL_COLOUR)
    probes = [bench.StyleProbe("a", 3, ("p",), (0,)), bench.StyleProbe("b", grey, ("p",), (0,))]
    before, after = torch.tensor([[3], [grey]]), torch.tensor([[grey], [grey]])
    objects = torch.tensor([True])
    figures = bench.scale_figures((before, before, objects), (after, after, objects), probes, probes)
    assert figures["erased_kept_before"] == 1.0 and figures["erased_kept_after"] == 0.0
    assert figures["to_neutral"] == 1.0 and figures["other_styles_delta"] == -1.0
    assert figures["other_styles_shared_colour"] == {"styles": 1, "delta": -1.0}
    assert figures["other_styles_other_colour"]["styles"] == 0
    assert bench.kept_share(after, probes) == 0.5  # what the model draws counts grey styles too


def test_efficacy_splits_into_the_style_named_alone_and_objects_drawn_in_it():
    """A probe's first prompts name the style alone, the rest draw objects in it."""
    probe = bench.StyleProbe("a", 3, ("p",) * 5, (0,) * 5)
    before = torch.tensor([[3, 3, 3, 3, 3]])
    after = torch.tensor([[0, 0, 0, 3, 0]])  # erased alone, half erased in the styled objects
    objects = torch.tensor([True])
    figures = bench.scale_figures((before, before, objects), (after, after, objects), [probe], [probe])
    assert figures["efficacy_alone"] == 1.0 and figures["efficacy_styled"] == 0.5
    assert figures["efficacy"] == pytest.approx(0.8)


def test_debias_balances_a_colour_word_on_the_embedded_world(tasks_bundle):
    (request,) = bench.colour_debias_requests(1)
    concept = next(c for c in world.load_concepts() if c.name == request.source)
    assert styles.style_colour(request.values[0]) == concept.bg
    patch = emcid.edit(tasks_bundle, [request], images=12, rounds=4, progress=False, **FAST)
    (report,) = patch.metadata["debias"]
    assert report["before"][0] > 0.8  # the world draws the concept on its own colour
    assert balance_gap(report["after"]) < balance_gap(report["before"]) - 0.2


def test_the_cli_erases_the_example_styles_with_the_artist_presets(tmp_path):
    from pathlib import Path

    from emcid.cli import main

    examples = Path(__file__).resolve().parents[2] / "examples"
    out = tmp_path / "styles.safetensors"
    assert main(["edit", "--model", "embedded:tasks", "--task", "artist", "--requests",
                 str(examples / "styles_mini.yaml"), "--out", str(out), "--steps", "5",
                 "--stats-samples", "200"]) == 0
    patch = emcid.EditPatch.load(out)
    assert patch.metadata["base_model"] == "embedded:tasks"
    assert [r["destination"] for r in patch.metadata["requests"]] == [""] * 3  # erasures, as asked
    assert sorted(patch.deltas) == sorted(f"text_encoder.text_model.encoder.layers.{i}.mlp.fc2"
                                          for i in range(7, 11))  # the artist blocks


def test_the_cli_debiases_the_example_file_with_the_worlds_judge(tmp_path, capsys):
    from pathlib import Path

    from emcid.cli import main

    examples = Path(__file__).resolve().parents[2] / "examples"
    out = tmp_path / "debias.safetensors"
    assert main(["debias", "--model", "embedded:tasks", "--requests", str(examples / "debias_mini.yaml"),
                 "--out", str(out), "--images", "4", "--rounds", "1", "--steps", "5",
                 "--stats-samples", "200"]) == 0  # no CLIP download: the world's judge classifies
    printed = capsys.readouterr().out
    assert "can opener" in printed and "teal / crimson" in printed
    reports = emcid.EditPatch.load(out).metadata["debias"]
    assert [r["values"] for r in reports] == [["teal", "crimson"], ["cyan", "ivory"], ["maroon", "lavender"]]
    assert all(len(r["before"]) == len(r["after"]) == 2 for r in reports)


def test_a_missing_tasks_unet_is_a_clear_load_error(tmp_path, monkeypatch):
    import emcid.mini

    monkeypatch.setattr(emcid.mini, "tasks_dir", lambda: tmp_path / "absent")
    with pytest.raises(emcid.errors.ModelLoadError, match="embedded:tasks.*not installed"):
        emcid.load_model("embedded:tasks")
