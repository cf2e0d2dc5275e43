"""Erase: an empty destination edits the source into the model's generic concept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import emcid
from emcid import EditRequest, load_requests
from emcid.tasks import generic_destination, resolve_erase

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "erase.yaml"


def test_erase_requests_in_every_file_format(tmp_path):
    (tmp_path / "erase.csv").write_text("source,destination\ntench,\nzebra,horse\n")
    (tmp_path / "erase.json").write_text('[{"source": "tench", "destination": ""}]')
    for name in ("erase.csv", "erase.json"):
        assert load_requests(tmp_path / name)[0].destination == ""
    assert all(r.destination == "" for r in load_requests(EXAMPLE))


def test_a_thousand_sources_resolve_to_the_neutral_word(sd1, monkeypatch):
    from emcid.mini import world

    requests = [EditRequest(f"concept {i}", "") for i in range(1000)] + [EditRequest("tench", "art")]
    assert resolve_erase(sd1, requests) == requests  # SD: the empty concept itself
    monkeypatch.setitem(sd1.settings, "world", "mini")
    monkeypatch.setattr(world, "NEUTRAL_NAME", "empty", raising=False)
    resolved = resolve_erase(sd1, requests)
    assert [r.destination for r in resolved] == ["empty"] * 1000 + ["art"]
    with pytest.raises(emcid.EmcidError, match="chain"):  # the neutral word is itself edited
        resolve_erase(sd1, [EditRequest("tench", ""), EditRequest("empty", "art")])


FAST = {"steps": 3, "stats_samples": 50}
METHODS = {"emcid": {**FAST, "lam": 1.0}, "memit": {**FAST, "lam": 1.0}, "refact": FAST, "time": {},
           "uce": {}}


@pytest.mark.parametrize("method, options", METHODS.items())
def test_every_method_erases_on_stable_diffusion(sd1, method, options):
    patch = emcid.edit(sd1, [EditRequest("tench", ""), EditRequest("zebra", "")], method=method,
                       progress=False, **options)
    assert patch.metadata["erase_destination"] == ""
    assert [r["destination"] for r in patch.metadata["requests"]] == ["", ""]
    assert any(float(d.dense().abs().max()) > 0 for d in patch.deltas.values())


def test_erase_on_the_embedded_model():
    """Two erased sources stop being drawn; a concept left alone is drawn as before."""
    from emcid.bench.judges import load_judge
    from emcid.generation import generate
    from emcid.mini import weights_present, world

    if not weights_present():
        pytest.skip("shipped mini weights absent")
    bundle = emcid.load_model()
    judge = load_judge(bundle)
    requests = load_requests(EXAMPLE)[:2]
    by_name = {c.name: c.index for c in world.load_concepts()}
    kept = "goldfish"
    concepts = [r.source for r in requests] + [kept]
    prompts = [t.format(c) for c in concepts for t in world.EDIT_TEMPLATES]
    classes = torch.tensor([by_name[c] for c in concepts for _ in world.EDIT_TEMPLATES])
    seeds = [100 + i for i in range(len(prompts))]

    def own_class_probability() -> torch.Tensor:
        probs = judge.predict_proba(generate(bundle, prompts, seeds, progress=False))
        return probs[torch.arange(len(prompts)), classes].view(len(concepts), -1).mean(1)

    before = own_class_probability()
    assert bool((before > 0.8).all()), before  # the model draws all three before the edit
    patch = emcid.edit(bundle, requests, progress=False, stats_samples=2000)
    assert patch.metadata["erase_destination"] == generic_destination(bundle)
    patch.apply(bundle)
    after = own_class_probability()
    assert bool((after[:2] < 0.1).all()), after
    assert abs(float(after[2] - before[2])) < 0.05, (before, after)


def test_erase_runs_on_sdxl(sdxl):
    patch = emcid.edit(sdxl, [EditRequest("tench", "")], progress=False, **METHODS["emcid"])
    assert {name.partition(".")[0] for name in patch.deltas} == {"text_encoder", "text_encoder_2"}
