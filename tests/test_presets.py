"""The presets table: release layers and Stage I values per family and task, model-folder
overrides, and configs that round-trip (to_dict / from_dict, patch -> editor)."""

import json
import shutil

import pytest
import yaml
from edit_helpers import FAST

import emcid
from emcid.editors import EDITORS, editor_from_patch, get_editor
from emcid.editors.emcid import EMCIDConfig
from emcid.editors.presets import PRESETS, TASKS, preset_options, resolve_layers
from emcid.errors import OptionError
from emcid.requests import ARTIST_PROMPTS
from emcid.tasks.edit import edit_patch


def _layers(family: str, depths: list[int], task: str = "object") -> dict:
    names = ["text_encoder", "text_encoder_2"][:len(depths)]

    class Fake:  # only what preset_options reads
        settings: dict = {}

    Fake.family = family
    spec = preset_options(("emcid",), Fake(), task)["layers"]
    return {n: resolve_layers(spec[n], d) for n, d in zip(names, depths)}


def test_release_layers_from_the_table():
    assert _layers("sd1", [12]) == {"text_encoder": list(range(11))}
    assert _layers("sd1", [12], "artist") == {"text_encoder": [7, 8, 9, 10]}
    assert _layers("sdxl", [12, 32]) == {"text_encoder": [8, 9, 10],
                                         "text_encoder_2": [26, 27, 28, 29, 30]}


def test_every_preset_names_a_registered_method_and_known_task():
    for preset in PRESETS:
        assert preset.method in EDITORS and (preset.task is None or preset.task in TASKS)
        assert preset.why


def test_memit_keeps_its_own_rows_over_its_parents(sd1):
    for task in ("aice", "rectification"):
        memit, emcid_editor = get_editor("memit", sd1, task=task), get_editor("emcid", sd1, task=task)
        assert memit.config.stage2.alpha == 0.5 and memit.config.reference_stage1 == {}
        assert memit.layers_for(sd1) == emcid_editor.layers_for(sd1)
    assert get_editor("emcid", sd1, task="aice").config.stage2.alpha == 0.6


@pytest.mark.parametrize("method, task, profile, scaled", [
    ("emcid", "object", None, True), ("emcid", "aice", None, True), ("emcid", "artist", None, False),
    ("emcid", "object", "release", False), ("memit", "aice", None, False)])
def test_statistics_without_sources_and_a_growing_lam_where_measured(sd1, method, task, profile, scaled):
    """Object edits and ICEB leave the sources out of C and grow lam past 50 edits; the artist
    task (measured: a trade), MEMIT's own update and the release profile keep the release's."""
    options = {"profile": profile} if profile else {}
    config = get_editor(method, sd1, task=task, **options).config
    assert config.stats_without_sources is scaled
    assert config.stage2.lam_edits == (50 if scaled else 0)
    assert config.stage2.lam_for(1000) == config.stage2.lam * (20 if scaled else 1)


@pytest.mark.parametrize("method, task, profile, both", [
    ("emcid", "object", None, True), ("emcid", "aice", None, True), ("emcid", "rectification", None, True),
    ("emcid", "artist", None, False), ("emcid", "object", "release", False)])
def test_stage1_distils_on_both_sides_where_measured(sd1, method, task, profile, both):
    """Objects and ICEB distil on the destination's images too; the artist task (measured: no
    gain), the release profile and rectification's reference-image requests keep the source's."""
    options = {"profile": profile} if profile else {}
    config = get_editor(method, sd1, task=task, **options).config
    assert config.stage1.distil_on == ("both" if both else "source")
    if task == "rectification":  # its undrawable classes' references: the model cannot draw them
        assert config.reference_stage1["distil_on"] == "source"


def test_artist_task_wires_steps_layers_and_prompts(sd1):
    editor = get_editor("emcid", sd1, task="artist", **FAST)
    assert editor.config.stage1.steps == 20  # the caller's value wins over the preset's 100
    assert get_editor("emcid", sd1, task="artist").config.stage1.steps == 100
    assert editor.layers_for(sd1) == {"text_encoder": [0, 1, 2]}  # -5:-1 of a 4-block encoder
    own = emcid.EditRequest("cat", "dog", ("a {} sleeping",))
    prepared = editor.prepare([emcid.EditRequest("Monet", "Van Gogh"), own], sd1)
    assert prepared[0].prompts[:3] == ARTIST_PROMPTS and len(prepared[0].prompts) == 3 + 4
    assert prepared[1] == own
    # the release profile writes the release's prompts alone
    release = get_editor("emcid", sd1, task="artist", profile="release")
    assert release.prepare([emcid.EditRequest("Monet", "")], sd1)[0].prompts == ARTIST_PROMPTS


def test_model_folder_overrides_reach_the_editor(sd1_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(sd1_dir, folder)
    (folder / "emcid.json").write_text(json.dumps(
        {"editor_overrides": {"emcid": {"image_steps": None, "lam": 7.0, "concept_batch": 32}}}))
    bundle = emcid.load_model(folder)
    editor = get_editor("memit", bundle)  # a variant inherits its parent's overrides
    assert editor.config.stage1.image_steps is None and editor.config.stage2.lam == 7.0
    assert editor.runtime.concept_batch == 32
    assert "concept_batch" not in json.dumps(editor.hparams())  # runtime, not a hyperparameter
    assert get_editor("emcid", bundle, lam=3.0).config.stage2.lam == 3.0  # the caller wins


def test_config_round_trips():
    config = EMCIDConfig.from_dict({"steps": 5, "lam": 10.0, "layers": {"text_encoder": [1]},
                                    "stage2": {"alpha": 0.3}})
    again = EMCIDConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.stage1.steps == 5 and again.stage2.alpha == 0.3
    with pytest.raises(OptionError, match="colour"):
        EMCIDConfig.from_dict({"stage1": {"colour": 1}})


@pytest.mark.parametrize("method", sorted(EDITORS))
def test_every_editor_round_trips_its_hparams(method, sd1):
    changed = {"emcid": {"steps": 3}, "memit": {"lam": 9.0}, "refact": {"layer": 1, "lr": 0.3},
               "time": {"lam": 0.5}, "uce": {"preserve": ["dog"]}, "esd": {"eta": 2.0}}[method]
    editor = get_editor(method, sd1, **changed)
    hparams = json.loads(json.dumps(editor.hparams()))
    rebuilt = EDITORS[method].from_hparams(hparams)
    assert rebuilt.hparams() == editor.hparams() != get_editor(method, sd1).hparams()


def test_patch_hparams_rebuild_its_editor(sd1):
    requests = [emcid.EditRequest("lobster", "crab")]
    patch = emcid.edit(sd1, requests, progress=False, task="artist", cache=False,
                       **{**FAST, "steps": 3})
    rebuilt = editor_from_patch(json.loads(json.dumps(patch.metadata)))
    assert rebuilt.hparams() == patch.metadata["hparams"] and rebuilt.task == "artist"
    again = edit_patch(rebuilt, sd1, [emcid.EditRequest(**r) for r in patch.metadata["requests"]],
                       progress=False)
    for name, delta in patch.deltas.items():
        assert (again.deltas[name].dense() - delta.dense()).abs().max() < 1e-5


def test_patches_of_earlier_versions_rebuild_their_editor():
    """Earlier patches kept runtime switches and the task among the hyperparameters."""
    old = {"method": "emcid", "hparams": {
        "stage1": {"steps": 7, "concept_batch": 8}, "stage2": {"lam": 5.0}, "layers": None,
        "task": "artist", "stats_samples": 50, "corpus": None, "cache": True, "reference_stage1": {}}}
    editor = editor_from_patch(old)
    assert editor.task == "artist" and editor.config.stage1.steps == 7 and editor.config.stage2.lam == 5.0


def test_cli_config_file(tmp_path, sd1_dir):
    from emcid.cli import main

    requests = tmp_path / "r.yaml"
    requests.write_text(yaml.safe_dump([{"source": "tench", "destination": "goldfish"}]))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"stage1": {"steps": 2}, "stats_samples": 40, "lam": 2.0,
                                      "layers": {"text_encoder": [1]}}))
    out = tmp_path / "p.safetensors"
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out", str(out),
                 "--config", str(config), "--lam", "3.0"]) == 0
    hparams = emcid.EditPatch.load(out).metadata["hparams"]
    assert hparams["stage1"]["steps"] == 2 and hparams["stats_samples"] == 40
    assert hparams["stage2"]["lam"] == 3.0  # a flag wins over the file
    assert hparams["layers"] == {"text_encoder": [1]}
