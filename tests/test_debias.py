"""Debias: factor tuning by generation + classification, the CLIP judge, bad input, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import emcid
from emcid.cli import main
from emcid.debias import (
    ClipZeroShot,
    DebiasConfig,
    DebiasRequest,
    balance_gap,
    debias,
    is_balanced,
    load_debias_requests,
    tune_factors,
)
from emcid.generation import generate_arrays

FAST = {"steps": 3, "stats_samples": 50, "lam": 1.0}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def biased_measure(balance_at: float, images: int = 25):
    """Shares of a model that draws value 0 too often: even only at factor ``balance_at``;
    counted over ``images`` images, as a classifier would."""
    calls = []

    def measure(factors):
        calls.append(list(factors))
        p = min(max(0.5 + 1.5 * (factors[0] - balance_at), 0.0), 1.0)
        count = round(images * p)
        return [count / images, (images - count) / images]

    return measure, calls


def test_factors_move_toward_balance_and_stop_by_the_rule():
    measure, calls = biased_measure(balance_at=0.3)
    config = DebiasConfig()
    tuning = tune_factors(measure, 2, config)
    assert calls[0] == [0.5, 0.5]  # starts even
    assert tuning.history[0]["shares"][0] > 0.7  # biased at the start
    assert abs(tuning.factors[0] - 0.3) < abs(0.5 - 0.3)  # the factor moved toward balance
    assert is_balanced(tuning.shares, config.tolerance)  # stopped on the rule ...
    assert len(calls) == tuning.rounds < config.rounds  # ... before the budget, no extra round
    assert is_balanced(tuning.history[-1]["shares"], config.tolerance)
    assert not any(is_balanced(h["shares"], config.tolerance) for h in tuning.history[:-1])


def test_the_budget_caps_the_rounds_and_the_best_round_is_kept():
    measure, calls = biased_measure(balance_at=-0.1)  # unreachable: factors stay in [0, 1]
    tuning = tune_factors(measure, 2, DebiasConfig(rounds=4))
    assert len(calls) == tuning.rounds == 4
    gaps = [balance_gap(h["shares"]) for h in tuning.history]
    assert balance_gap(tuning.shares) == min(gaps)
    assert tuning.factors == tuning.history[gaps.index(min(gaps))]["factors"]
    assert tuning.factors[0] < 0.5  # pushed away from the over-drawn value


def test_three_values_are_tuned_to_thirds():
    def measure(factors):  # value 2 drawn twice as often as its factor says
        raw = [factors[0], factors[1], 2 * factors[2]]
        return [r / sum(raw) for r in raw]

    tuning = tune_factors(measure, 3, DebiasConfig(rounds=10, tolerance=0.02))
    assert is_balanced(tuning.shares, 0.02)
    assert tuning.factors[2] < 1 / 3 < tuning.factors[0]


def nearest_reference(bundle, request, count):
    """A classifier judging each image by the closer of the unedited model's drawings of the
    values with the same seed (what "a goldfish tench" should look like)."""
    seeds = [request.seed + i for i in range(count)]
    refs = {label: generate_arrays(bundle, [f"an image of {label}"] * count, seeds, progress=False).float()
            for label in request.destinations()}

    def classify(images, labels):
        pixels = torch.tensor(np.stack([np.asarray(i) for i in images])).float()
        return torch.stack([-(pixels - refs[label]).flatten(1).norm(dim=1) for label in labels], 1)

    return classify


def test_debias_on_tiny_sd_balances_a_biased_concept(sd1):
    request = DebiasRequest("tench", ["goldfish", "zebra"])
    assert request.destinations() == ["a goldfish tench", "a zebra tench"]
    classifier = nearest_reference(sd1, request, 25)
    weights = {n: p.detach().clone() for n, p in sd1.text_encoder.named_parameters()}
    patch = debias(sd1, [request], classifier, DebiasConfig(rounds=4), progress=False, **FAST)
    (report,) = patch.metadata["debias"]
    assert patch.metadata["requests"] == [request.to_dict()]
    assert 1 <= report["rounds"] <= 4 and len(report["history"]) == report["rounds"]
    assert sum(report["factors"]) == pytest.approx(1.0)
    for key in ("before", "after", "tuned"):
        assert sum(report[key]) == pytest.approx(1.0)
    assert balance_gap(report["after"]) < balance_gap(report["before"])
    assert patch.metadata["hparams"]["stage1"]["distil_on"] == "source"  # measured: mixes settle
    current = dict(sd1.text_encoder.named_parameters())
    assert all(torch.equal(current[n], w) for n, w in weights.items())  # tuning left no trace
    patch.apply(sd1)
    assert not all(torch.equal(current[n], w) for n, w in weights.items())


def test_debias_on_tiny_sdxl_edits_both_encoders(sdxl):
    def brightness(images, labels):  # bright images count as the first value
        means = torch.tensor([float(np.asarray(i).mean()) for i in images])
        return torch.stack([means, torch.full_like(means, 128.0)], 1)

    request = DebiasRequest("tench", ["goldfish", "zebra"])
    patch = debias(sdxl, [request], brightness, DebiasConfig(images=4, rounds=2), progress=False,
                   **FAST)
    assert {name.split(".")[0] for name in patch.deltas} == {"text_encoder", "text_encoder_2"}
    assert patch.metadata["debias"][0]["rounds"] <= 2


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (text + vision) with its processor, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from emcid.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_tokenizer(folder / "tok", ["a", "an", "male", "female", "tench", "image", "of"])
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_zero_shot_classifier_on_a_tiny_random_clip(tiny_clip):
    from PIL import Image

    classify = ClipZeroShot(str(tiny_clip))
    images = [Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)) for value in (0, 128, 255)]
    probs = classify(images, ["a male tench", "a female tench"])
    assert probs.shape == (3, 2)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert not torch.allclose(probs[0], probs[2])  # the images are looked at


def test_missing_clip_is_a_clear_error(tmp_path):
    with pytest.raises(emcid.EmcidError, match="CLIP classifier"):
        ClipZeroShot(str(tmp_path / "absent"))


@pytest.mark.parametrize("values, message", [
    (["male"], "at least two"), ([], "at least two"), (["male", " Male "], "repeats"),
    (["male", ""], "at least two"),
])
def test_bad_values_name_the_request(values, message):
    with pytest.raises(emcid.EmcidError, match=f"'doctor'.*{message}"):
        DebiasRequest("doctor", values)


def test_bad_request_files_are_refused_before_anything_is_written(tmp_path, sd1_dir, capsys):
    bad = tmp_path / "one.yaml"
    bad.write_text(yaml.safe_dump([{"source": "nurse", "debias": ["male", "female"]},
                                   {"source": "doctor", "debias": ["male"]}]))
    with pytest.raises(emcid.EmcidError, match="request 2.*'doctor'.*two attribute values"):
        load_debias_requests(bad)
    out = tmp_path / "patch.safetensors"
    assert main(["debias", "--model", str(sd1_dir), "--requests", str(bad), "--out", str(out)]) == 2
    assert "'doctor'" in capsys.readouterr().err
    assert not out.exists()
    twice = tmp_path / "twice.json"
    twice.write_text('[{"source": "doctor", "debias": ["male", "female"]},'
                     ' {"source": "a doctor", "debias": ["young", "old"]}]')
    with pytest.raises(emcid.EmcidError, match="debiased twice"):
        load_debias_requests(twice)
    missing = tmp_path / "plain.yaml"
    missing.write_text(yaml.safe_dump([{"source": "doctor", "destination": "nurse"}]))
    with pytest.raises(emcid.EmcidError, match="unknown debias request fields"):
        load_debias_requests(missing)


def test_request_files_in_every_format(tmp_path):
    example = load_debias_requests(Path(__file__).resolve().parents[1] / "examples" / "debias.yaml")
    assert [r.noun for r in example] == ["doctor", "nurse", "engineer"]
    (tmp_path / "r.csv").write_text("source,debias,seed\nengineer,male|female,3\n")
    (tmp_path / "r.yaml").write_text("requests:\n- {source: an engineer, debias: [male, female], seed: 3}\n")
    loaded = [load_debias_requests(tmp_path / name)[0] for name in ("r.csv", "r.yaml")]
    for request in loaded:
        assert request.values == ("male", "female") and request.seed == 3
        assert request.concept() == "an engineer"
        assert request.destinations() == ["a male engineer", "a female engineer"]
    assert DebiasRequest.from_dict(loaded[1].to_dict()) == loaded[1]


def test_debias_cli_with_a_tiny_clip(tmp_path, sd1_dir, tiny_clip, capsys):
    requests = tmp_path / "debias.yaml"
    requests.write_text(yaml.safe_dump([{"source": "tench", "debias": ["male", "female"]}]))
    out = tmp_path / "debias.safetensors"
    assert main(["debias", "--model", str(sd1_dir), "--requests", str(requests), "--out", str(out),
                 "--classifier", str(tiny_clip), "--images", "4", "--rounds", "2", "--steps", "2",
                 "--stats-samples", "50", "--lam", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "tench" in printed and "before" in printed and "after" in printed
    (report,) = emcid.EditPatch.load(out).metadata["debias"]
    assert report["values"] == ["male", "female"] and len(report["after"]) == 2


def test_the_embedded_model_debiases_colour_words_of_its_tasks_variant_only(sd1, monkeypatch):
    monkeypatch.setitem(sd1.settings, "world", "mini")
    with pytest.raises(emcid.EmcidError, match="draws no attribute words.*embedded:tasks"):
        debias(sd1, [DebiasRequest("tench", ["teal", "amber"])])
    monkeypatch.setitem(sd1.settings, "tasks", ["colour_words"])
    with pytest.raises(emcid.EmcidError, match="colour words .*'male' is not one"):
        debias(sd1, [DebiasRequest("tench", ["teal", "male"])])


def brightness(images, labels):
    """Bright images count as the first value."""
    means = torch.tensor([float(np.asarray(i).mean()) for i in images])
    return torch.stack([means, torch.full_like(means, 128.0)], 1)


def test_emcid_edit_routes_debias_rows_to_the_debias_task(sd1):
    rows = [{"source": "tench", "debias": ["goldfish", "zebra"]}]
    routed = emcid.edit(sd1, rows, classifier=brightness, images=4, rounds=2, progress=False, **FAST)
    direct = debias(sd1, [DebiasRequest("tench", ["goldfish", "zebra"])], brightness,
                    DebiasConfig(images=4, rounds=2), progress=False, **FAST)
    assert routed.metadata["task"] == "debias"
    assert routed.metadata["debias"][0]["rounds"] <= 2
    assert routed.metadata["hparams"]["debias"]["images"] == 4
    assert sorted(routed.deltas) == sorted(direct.deltas)
    assert all(torch.allclose(routed.deltas[n].dense(), direct.deltas[n].dense()) for n in direct.deltas)


def test_one_loader_reads_both_kinds(tmp_path):
    example = emcid.load_requests(EXAMPLES / "debias.yaml")
    assert all(isinstance(r, DebiasRequest) for r in example)
    assert [r.noun for r in example] == ["doctor", "nurse", "engineer"]
    (tmp_path / "r.csv").write_text("source,debias,seed\nengineer,male|female,3\n")
    (request,) = emcid.load_requests(tmp_path / "r.csv")
    assert request.values == ("male", "female") and request.seed == 3
    assert all(isinstance(r, emcid.EditRequest) for r in emcid.load_requests(EXAMPLES / "requests.yaml"))


MIXED_FILES = {
    "mixed.yaml": yaml.safe_dump([{"source": "tench", "destination": "goldfish"},
                                  {"source": "doctor", "debias": ["male", "female"]}]),
    "mixed.csv": "source,destination,debias\ntench,goldfish,\ndoctor,,male|female\n",
}


@pytest.mark.parametrize("name", sorted(MIXED_FILES))
def test_a_file_mixing_edits_and_debias_is_refused_before_the_model_loads(name, tmp_path, capsys):
    (tmp_path / name).write_text(MIXED_FILES[name])
    out = tmp_path / "p.safetensors"
    assert main(["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(tmp_path / name),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "debias" in err and ("separate files" in err or "split them" in err)
    assert "nowhere" not in err and not out.exists()


def test_a_list_mixing_edits_and_debias_is_refused(sd1):
    with pytest.raises(emcid.EmcidError, match="request 2 is a debias request but request 1 is an edit"):
        emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish"), DebiasRequest("doctor", ["male", "female"])])


@pytest.mark.parametrize("rows, flags, expected", [
    ([{"source": "doctor", "debias": ["male"]}], [], "two attribute values"),
    ([{"source": "doctor", "debias": ["male", "female"], "seed": "x"}], [], "request 1"),
    ([{"source": "doctor", "debias": ["male", "female"]}], ["--method", "uce"], "cannot debias"),
    ([{"source": "doctor", "debias": ["male", "female"]}], ["--rounds", "0"], "rounds"),
    ([{"source": "doctor", "debias": ["male", "female"]}], ["--lam", "0"], "lam"),
    ([{"source": "tench", "destination": "goldfish"}], ["--images", "4"], "--images"),
])
def test_bad_debias_input_to_edit_fails_before_the_model_loads(rows, flags, expected, tmp_path, capsys):
    requests = tmp_path / "r.yaml"
    requests.write_text(yaml.safe_dump(rows))
    out = tmp_path / "p.safetensors"
    assert main(["edit", "--model", str(tmp_path / "nowhere"), "--requests", str(requests),
                 "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and "nowhere" not in err and "Traceback" not in err
    assert not out.exists()


def test_edit_cli_debiases_a_debias_request_file(tmp_path, sd1_dir, tiny_clip, capsys):
    requests = tmp_path / "debias.csv"
    requests.write_text("source,debias\ntench,male|female\n")
    out = tmp_path / "debias.safetensors"
    assert main(["edit", "--model", str(sd1_dir), "--requests", str(requests), "--out", str(out),
                 "--classifier", str(tiny_clip), "--images", "4", "--rounds", "2", "--steps", "2",
                 "--stats-samples", "50", "--lam", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "1 concept debiased in 3 modules" in printed
    patch = emcid.EditPatch.load(out)
    assert patch.metadata["task"] == "debias"
    (report,) = patch.metadata["debias"]
    assert report["values"] == ["male", "female"] and report["rounds"] <= 2
