"""End to end on the tiny model: results.json and report.html, the pre-edit image cache, the CLI."""

import json
from collections import Counter

import pytest

import emcid.core.generation as generation
from emcid.bench.iceb import METRICS, run_iceb

# Classes 0-5 of ImageNet; with a holdout fraction of 0.5 that is 3 edit and 3 holdout classes.
CLASSES = tuple(range(6))
# Every alias counts as badly drawn and every class as drawable, so rectification has work
# to do even though the stand-in judge's probabilities are all tiny.
RECTIFY_ALL = {"bad_alias_threshold": 1.01, "drawable_threshold": 0.0}


def _counting(monkeypatch):
    """Record (fingerprint, prompt, seed) of every image the generator draws."""
    calls = []
    original = generation.generate_arrays

    def counted(bundle, prompts, seeds, *args, **kwargs):
        fingerprint = bundle.fingerprint()
        calls.extend((fingerprint, p, int(s)) for p, s in zip(prompts, seeds))
        return original(bundle, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_arrays", counted)
    return calls


def test_two_class_run_writes_results_and_report(tiny_bundle, fake_judge, fast_emcid, tmp_path):
    out = tmp_path / "iceb"
    results = run_iceb(tiny_bundle, edits=(1, 2), out=out, judge=fake_judge, options=fast_emcid,
                       classes=CLASSES, progress=False, **RECTIFY_ALL)
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True
    assert saved["subtasks"].keys() == {"aice", "rectification"}
    for subtask in ("aice", "rectification"):
        scales = saved["subtasks"][subtask]["scales"]
        assert set(scales) == {"1", "2"}
        entry = scales["2"]["emcid"]
        for metric in METRICS:
            assert isinstance(entry[metric], float), (subtask, metric)
        assert len(entry["per_class"]["source2dest_efficacy"]) == 2
        assert entry["n_edits"] == 2
    aice = saved["subtasks"]["aice"]
    holdout = set(aice["holdout_classes"])
    assert len(holdout) == 3 and not holdout & {e["source"] for e in aice["edits"]}
    assert {e["destination"] for e in aice["edits"]} <= holdout
    assert saved["settings"]["method_options"]["aice"]["alpha"] == 0.6  # release value for AICE
    assert saved["versions"]["torch"] and saved["timings"]["total_s"] > 0
    assert tiny_bundle.fingerprint() == saved["model_fingerprint"]  # every edit was reverted
    html = (out / "report.html").read_text()
    assert "Holdout Delta" in html and "plots/aice.png" in html and "grids/aice_edits.png" in html
    for path in [*results["report"]["plots"].values(), *results["report"]["grids"].values()]:
        assert (out / path).stat().st_size > 1000


def test_pre_edit_images_are_generated_once(tiny_bundle, fake_judge, fast_emcid, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    base = tiny_bundle.fingerprint()
    options = {**fast_emcid, "image_guidance_scale": None}  # Stage I shares the model's images
    kwargs = dict(judge=fake_judge, options=options, classes=CLASSES, subtasks=("aice",), progress=False)
    first = run_iceb(tiny_bundle, edits=(1, 2, 3), out=tmp_path / "a", **kwargs)
    pre = Counter((p, s) for f, p, s in calls if f == base)
    assert len(pre) >= first["images"]["unique_prompts"]
    assert max(pre.values()) == 1  # three scales, yet no pre-edit image was drawn twice
    post = [c for c in calls if c[0] != base]
    assert post  # the edited model is sampled at each scale
    calls.clear()
    run_iceb(tiny_bundle, edits=(1, 2, 3), out=tmp_path / "b", **kwargs)
    assert not [c for c in calls if c[0] == base]  # a second sweep takes them all from the cache
    assert len(calls) == len(post)  # ... and draws the same post-edit images again


def test_a_failed_sweep_keeps_the_scales_it_measured(tiny_bundle, fake_judge, fast_emcid, tmp_path,
                                                     monkeypatch):
    from emcid.bench import iceb

    original, calls = iceb.edit_patch, []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the second edit")
        return original(*args, **kwargs)

    monkeypatch.setattr(iceb, "edit_patch", failing_second)
    with pytest.raises(RuntimeError, match="simulated"):
        run_iceb(tiny_bundle, edits=(1, 2), out=tmp_path, judge=fake_judge, options=fast_emcid,
                 classes=CLASSES, subtasks=("aice",), progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False
    assert list(saved["subtasks"]["aice"]["scales"]) == ["1"]
    assert tiny_bundle.fingerprint() == saved["model_fingerprint"]


def test_unknown_subtask_is_refused(tiny_bundle, fake_judge, tmp_path):
    from emcid.errors import EmcidError

    with pytest.raises(EmcidError):
        run_iceb(tiny_bundle, out=tmp_path, judge=fake_judge, subtasks=("nope",), progress=False)


def test_cli_bench_iceb(sd1_dir, tmp_path, capsys):
    """`emcid bench iceb` parses into one run_iceb call; a tiny random ViT is the judge."""
    import argparse

    from emcid.bench.cli import register

    parser = argparse.ArgumentParser(prog="emcid")
    register(parser.add_subparsers(dest="command", required=True))
    config = tmp_path / "options.yaml"
    config.write_text("stage1: {steps: 5}\nstats_samples: 64\n")
    args = parser.parse_args(["bench", "iceb", "--model", str(sd1_dir), "--edits", "1", "--holdout-eval", "3",
                              "--out", str(tmp_path / "cli"), "--subtasks", "aice", "--steps", "2",
                              "--config", str(config), "--judge", _vit(tmp_path),
                              "--precision", "fp32", "--weights-dtype", "float32"])
    assert args.edits == (1,) and args.subtasks == ("aice",)
    args.func(args)
    printed = capsys.readouterr().out
    assert "aice" in printed and "results.json" in printed
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert saved["judge"] == _vit(tmp_path)
    hparams = saved["hparams"]["aice"]
    assert hparams["stage1"]["steps"] == 2 and hparams["stats_samples"] == 64  # flag over file
    assert saved["dtype"] == "torch.float32"
    # --dtype, the old name of --weights-dtype, still parses
    assert parser.parse_args(["bench", "iceb", "--out", "o", "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert saved["subtasks"]["aice"]["scales"]["1"]["emcid"]["source2dest_efficacy"] is not None
    demo = parser.parse_args(["demo"])
    assert demo.out == "emcid-demo"


def _vit(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path / "vit"
    if not folder.exists():
        config = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, num_labels=1000)
        ViTForImageClassification(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["uce", "time"])
def test_baselines_run_through_the_same_benchmark(method, tiny_bundle, fake_judge, tmp_path):
    """Any registered editor runs ICEB; its entries sit beside EMCID's in one results.json."""
    from emcid.editors import EDITORS

    assert method in EDITORS  # a baseline that is not registered is a failure, not a skip
    run_iceb(tiny_bundle, method=method, edits=(1,), out=tmp_path, judge=fake_judge, classes=CLASSES,
             subtasks=("aice",), progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    entry = saved["subtasks"]["aice"]["scales"]["1"][method]
    assert all(isinstance(entry[m], float) for m in METRICS if m != "alias2dest")
    assert saved["settings"]["method_options"]["aice"] == {}  # EMCID's alpha is not forced on others


def test_cache_root_reaches_the_editor(tiny_bundle, fake_judge, fast_emcid, tmp_path, private_cache):
    """The run's cache folder holds the editor's Stage I targets and statistics as well."""
    root = tmp_path / "run-cache"
    run_iceb(tiny_bundle, edits=(1,), out=tmp_path / "o", judge=fake_judge, options=fast_emcid,
             classes=CLASSES, subtasks=("aice",), progress=False, cache_root=str(root))
    assert {"images", "stage1", "stats"} <= {p.name for p in root.iterdir()}
    assert not private_cache.exists()  # nothing went to $EMCID_CACHE
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["hparams"]["aice"]["stage2"]["alpha"] == 0.6
