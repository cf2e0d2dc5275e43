"""earlier_edits="replay": a batch edited on a chain leaves the model holding one batch of every
concept so far, whether the chain was applied in this session or recorded in a folder."""

import pytest
import torch
from edit_helpers import FAST

import emcid
from emcid.errors import OptionError
from emcid.patch import save_pipeline

OPTIONS = {**FAST, "steps": 5, "layers": {"text_encoder": [1, 2]}, "earlier_edits": "replay"}
FIRST = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("volcano", "beacon")]


def _weights(bundle, names) -> dict[str, torch.Tensor]:
    return {n: bundle.module(n).weight.detach().double().clone() for n in names}


def _assert_one_batch(bundle, base: dict, one_batch, replayed_weights: dict) -> None:
    """The replayed chain's weights are the base plus the one-batch patch's deltas."""
    for name, weight in replayed_weights.items():
        expected = base[name] + one_batch.deltas[name].dense().double()
        scale = float(one_batch.deltas[name].dense().abs().max())
        assert float((weight - expected).abs().max()) < 1e-4 * scale, name


def test_a_replayed_batch_leaves_one_batch_of_the_whole_chain(sd1):
    later = [emcid.EditRequest("church", "castle")]
    one_batch = emcid.edit(sd1, FIRST + later, progress=False, **OPTIONS)
    names = list(one_batch.deltas)
    base = _weights(sd1, names)
    first = emcid.edit(sd1, FIRST, progress=False, **OPTIONS)
    assert "stage2_replayed" not in first.metadata  # nothing to replay on the bare model
    first.apply(sd1)
    second = emcid.edit(sd1, later, progress=False, **OPTIONS)
    assert second.metadata["stage2_replayed"] == 2
    assert len(second.metadata["stage1_steps"]) == 1  # its own request's, not the replayed ones'
    assert second.metadata["stage2_lam"] == one_batch.metadata["stage2_lam"]
    second.apply(sd1)
    _assert_one_batch(sd1, base, one_batch, _weights(sd1, names))
    second.revert(sd1)
    first.revert(sd1)
    assert all(torch.equal(base[n], w) for n, w in _weights(sd1, names).items())


def test_a_recorded_chain_replays_and_a_source_edited_again_keeps_its_last_request(tmp_path, sd1):
    again = [emcid.EditRequest("tench", "castle")]
    one_batch = emcid.edit(sd1, [FIRST[1]] + again, progress=False, **OPTIONS)
    names = list(one_batch.deltas)
    base = _weights(sd1, names)
    first = emcid.edit(sd1, FIRST, progress=False, **OPTIONS)
    first.apply(sd1)
    chained = emcid.load_model(save_pipeline(sd1, tmp_path / "one"))
    first.revert(sd1)
    second = emcid.edit(chained, again, progress=False, **OPTIONS)
    assert second.metadata["stage2_replayed"] == 1  # volcano; tench is edited again
    second.apply(chained)
    _assert_one_batch(chained, base, one_batch, _weights(chained, names))


@pytest.mark.parametrize("made_by", ["scale", "other layers", "debias"])
def test_a_chain_replay_cannot_redo_is_refused_before_any_work(sd1, made_by, monkeypatch):
    from emcid.editors import emcid as editor_module

    if made_by == "scale":
        emcid.edit(sd1, FIRST, progress=False, **OPTIONS).apply(sd1, scale=0.5)
    elif made_by == "other layers":
        emcid.edit(sd1, FIRST, progress=False, **{**OPTIONS, "layers": {"text_encoder": [0]}}).apply(sd1)
    else:  # another task's patch: debias mixes targets that replay cannot remake
        patch = emcid.edit(sd1, FIRST, progress=False, **OPTIONS)
        patch.metadata["task"] = "debias"
        patch.apply(sd1)
    monkeypatch.setattr(editor_module, "compute_targets", lambda *a, **k: pytest.fail("Stage I ran"))
    expected = {"scale": "scale 0.5", "other layers": "does not edit", "debias": "debias task"}[made_by]
    with pytest.raises(OptionError, match=f"earlier_edits='replay'.*{expected}"):
        emcid.edit(sd1, [emcid.EditRequest("church", "castle")], progress=False, **OPTIONS)


def test_the_replayed_requests_keep_each_sources_last_patch_and_its_erase_destination():
    """A source edited by several patches keeps the last one's request (names compared as a
    batch compares them); erases take the destination their patch recorded; a chain across
    batches (A -> B, then B -> C) is refused as one batch refuses it."""
    from types import SimpleNamespace

    from emcid.core.chain import PatchChain
    from emcid.editors.emcid.replay import earlier_requests
    from emcid.errors import RequestError

    def step(requests, erase_destination="canvas"):
        return {"method": "emcid", "task": "edit", "scale": 1.0, "erase_destination": erase_destination,
                "requests": [emcid.EditRequest(s, d).to_dict() for s, d in requests]}

    chain = PatchChain(history=[step([("tench", "goldfish"), ("volcano", ""), ("church", "castle")]),
                                step([("Tench ", "beacon"), ("sea lion", "")], "plain")])
    bundle = SimpleNamespace(chain=chain)
    found = earlier_requests(bundle, [emcid.EditRequest("church", "tower")])
    assert [(r.source, r.destination) for r in found] == [
        ("volcano", "canvas"), ("Tench", "beacon"), ("sea lion", "plain")]
    with pytest.raises(RequestError, match="earlier_edits='replay'.*chain.*'hold'"):
        earlier_requests(bundle, [emcid.EditRequest("beacon", "tower")])


@pytest.mark.parametrize("damaged", [False, True])
def test_a_chain_folder_keeps_its_stage1_targets_for_a_replay_on_another_machine(tmp_path, sd1, monkeypatch,
                                                                                damaged):
    from emcid.editors.emcid.stage1 import schedule

    later = [emcid.EditRequest("church", "castle")]
    first = emcid.edit(sd1, FIRST, progress=False, **OPTIONS)
    assert len(first.metadata["stage1_keys"]) == len(FIRST)
    first.apply(sd1)
    folder = save_pipeline(sd1, tmp_path / "one")
    first.revert(sd1)
    kept = folder / "emcid_history" / "stage1"
    assert sorted(p.stem for p in kept.glob("*.safetensors")) == sorted(first.metadata["stage1_keys"])
    expected = emcid.edit(emcid.load_model(folder), later, progress=False, **OPTIONS)
    if damaged:
        (kept / f"{first.metadata['stage1_keys'][1]}.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setenv("EMCID_CACHE", str(tmp_path / "another-machine"))
    computed = []
    compute_z = schedule.compute_z

    def counting(bundle, requests, *args, **kwargs):
        computed.extend(r.source for r in requests)
        return compute_z(bundle, requests, *args, **kwargs)

    monkeypatch.setattr(schedule, "compute_z", counting)
    second = emcid.edit(emcid.load_model(folder), later, progress=False, **OPTIONS)
    assert computed == (["volcano", "church"] if damaged else ["church"])
    for name, delta in expected.deltas.items():
        assert torch.allclose(second.deltas[name].dense(), delta.dense(), atol=1e-6)
    # a folder written from the chained folder carries the recorded step's targets forward (the
    # new step's come from the cache, empty here)
    chained = emcid.load_model(folder)
    second.apply(chained)
    monkeypatch.setenv("EMCID_CACHE", str(tmp_path / "a-third-machine"))
    again = save_pipeline(chained, tmp_path / "two") / "emcid_history" / "stage1"
    assert {p.stem for p in again.glob("*.safetensors")} == set(first.metadata["stage1_keys"])
