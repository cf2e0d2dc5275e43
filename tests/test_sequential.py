"""Sequential edits: a model carrying patches is edited with its base model's statistics, and
the new patch records (and checks) the chain it was made on."""

import pytest
import torch
from edit_helpers import FAST, assert_same_state, model_state

import emcid
from emcid.cache import TensorCache
from emcid.errors import PatchMismatchError
from emcid.patch import base_weights, revert_last, save_pipeline
from emcid.stats import second_moments

OPTIONS = {**FAST, "steps": 5}


def _stats_files(cache_folder) -> set[str]:
    folder = cache_folder / "stats"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture
def first(sd1):
    return emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish")], progress=False, **OPTIONS)


@pytest.fixture
def chained(tmp_path, sd1, first):
    """A folder written by apply: the tiny base model carrying ``first``."""
    first.apply(sd1)
    bundle = emcid.load_model(save_pipeline(sd1, tmp_path / "one"))
    first.revert(sd1)
    return bundle


def test_second_edit_uses_the_base_statistics_and_reverts_to_the_base(
        tmp_path, sd1, first, chained, isolated_cache):
    base_state, base_fingerprint = model_state(sd1), sd1.fingerprint()
    names = list(first.deltas)
    nocache = TensorCache("stats", enabled=False)
    base_moments = second_moments(sd1, names, None, OPTIONS["stats_samples"], cache=nocache,
                                  progress=False)
    patched_moments = second_moments(chained, names, None, OPTIONS["stats_samples"], cache=nocache,
                                     progress=False)
    assert not all(torch.equal(base_moments[n], patched_moments[n]) for n in names)
    with base_weights(chained):
        inside = second_moments(chained, names, None, OPTIONS["stats_samples"], cache=nocache,
                                progress=False)
    assert all(torch.equal(base_moments[n], inside[n]) for n in names)

    entries = _stats_files(isolated_cache)  # the base model's, written by the first edit
    patched_state = model_state(chained)
    second = emcid.edit(chained, [emcid.EditRequest("zebra", "horse")], progress=False, **OPTIONS)
    assert _stats_files(isolated_cache) == entries  # read from the base model's cache entry
    assert_same_state(model_state(chained), patched_state)
    assert second.metadata["chain"] == {"base_fingerprint": base_fingerprint,
                                        "patches": [first.checksum]}

    second.apply(chained)  # made on this model: applies without force
    two = emcid.load_model(save_pipeline(chained, tmp_path / "two"))
    assert [s["sha256"] for s in two.history] == [first.checksum, second.checksum]
    revert_last(two)
    assert_same_state(model_state(two), patched_state)
    revert_last(two)
    assert_same_state(model_state(two), base_state)


@pytest.mark.parametrize("carried", ["recorded", "in memory", "both"])
def test_base_weights_restore_the_base_then_the_edits(tmp_path, sd1, first, chained, carried):
    base_state = model_state(sd1)
    bundle = sd1 if carried == "in memory" else chained
    if carried != "recorded":
        patch = emcid.edit(bundle, [emcid.EditRequest("zebra", "horse")], progress=False, **OPTIONS)
        patch.apply(bundle)
    if carried == "in memory":
        first.apply(sd1, force=True)  # a second in-memory patch, on top of the first
    edited = model_state(bundle)
    assert any(not torch.equal(edited[k], base_state[k]) for k in edited)
    with base_weights(bundle):
        assert_same_state(model_state(bundle), base_state)
    assert_same_state(model_state(bundle), edited)


def test_chain_edit_refused_on_the_bare_base_and_on_another_chain(sd1, sd1_dir, first, chained):
    second = emcid.edit(chained, [emcid.EditRequest("zebra", "horse")], progress=False, **OPTIONS)
    with pytest.raises(PatchMismatchError, match="carrying 1 patch.*that model without them"):
        second.apply(sd1)
    other = emcid.load_model(sd1_dir)
    emcid.edit(other, [emcid.EditRequest("carp", "goldfish")], progress=False, **OPTIONS).apply(other)
    with pytest.raises(PatchMismatchError, match="this model is .* carrying 1 patch"):
        second.apply(other)
    second.apply(sd1, force=True)


def test_base_weights_refuse_a_folder_changed_after_it_was_written(first, chained):
    weight = chained.module(next(iter(first.deltas))).weight
    weight.data.mul_(2)
    changed = weight.detach().clone()
    with pytest.raises(PatchMismatchError, match="changed after emcid wrote it"):
        with base_weights(chained):
            pass
    assert torch.equal(weight, changed)


def test_refact_statistics_come_from_the_base(monkeypatch, sd1, first, chained):
    import emcid.editors.refact as refact

    seen = []

    def spy(bundle, *args, **kwargs):
        seen.append(bundle.fingerprint(components=("text_encoder",)))
        return second_moments(bundle, *args, **kwargs)

    monkeypatch.setattr(refact, "second_moments", spy)
    emcid.edit(chained, [emcid.EditRequest("zebra", "horse")], method="refact", progress=False,
               steps=3, stats_samples=OPTIONS["stats_samples"])
    assert seen == [sd1.fingerprint(components=("text_encoder",))]
    assert chained.fingerprint(components=("text_encoder",)) != seen[0]


def test_command_line_sequential_edit_and_two_reverts(tmp_path, sd1, sd1_dir, capsys):
    import yaml

    from emcid.cli import main

    fast = ["--steps", "3", "--stats-samples", "50", "--lam", "1.0"]
    paths = {}
    for step, (model, source, destination) in enumerate(
            [(sd1_dir, "tench", "goldfish"), (tmp_path / "one", "zebra", "horse")], 1):
        requests = tmp_path / f"requests-{step}.yaml"
        requests.write_text(yaml.safe_dump([{"source": source, "destination": destination}]))
        paths[step] = tmp_path / f"edit-{step}.safetensors"
        assert main(["edit", "--model", str(model), "--requests", str(requests), "--out",
                     str(paths[step]), *fast]) == 0
        if step == 1:
            assert main(["apply", "--model", str(sd1_dir), "--patch", str(paths[1]), "--out",
                         str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(sd1_dir), "--patch", str(paths[2]), "--out",
                 str(tmp_path / "wrong")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("emcid: error")]
    assert len(errors) == 1 and "without them" in errors[0]
    assert not (tmp_path / "wrong").exists()
    assert main(["apply", "--model", str(tmp_path / "one"), "--patch", str(paths[2]), "--out",
                 str(tmp_path / "two")]) == 0
    assert main(["revert", "--model", str(tmp_path / "two"), "--out", str(tmp_path / "back-one")]) == 0
    assert main(["revert", "--model", str(tmp_path / "back-one"), "--out", str(tmp_path / "base")]) == 0
    assert_same_state(model_state(emcid.load_model(tmp_path / "base")), model_state(sd1))
