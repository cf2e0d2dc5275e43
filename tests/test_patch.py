import pytest
import torch
from edit_helpers import FAST

import emcid
from emcid import EditPatch
from emcid.errors import PatchMismatchError
from emcid.patch import DeltaWeight


@pytest.fixture
def patch(sd1):
    return emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish")], progress=False,
                      **{**FAST, "steps": 5})


def _fc2_weights(bundle):
    return {n: bundle.module(n).weight.detach().clone() for n in
            [bundle.slot("text_encoder").fc2_name(i) for i in range(4)]}


def test_apply_then_revert_is_bit_exact(sd1, patch):
    original = _fc2_weights(sd1)
    patch.apply(sd1)
    changed = _fc2_weights(sd1)
    assert any(not torch.equal(original[n], changed[n]) for n in original)
    patch.revert(sd1)
    for name, weight in _fc2_weights(sd1).items():
        assert torch.equal(weight, original[name])


def test_round_trip_through_disk(tmp_path, sd1, patch):
    path = patch.save(tmp_path / "p.safetensors")
    loaded = EditPatch.load(path)
    assert loaded.metadata == patch.metadata
    assert loaded.metadata["requests"][0]["source"] == "tench"
    assert set(loaded.deltas) == set(patch.deltas)
    for name in patch.deltas:
        assert torch.equal(loaded.deltas[name].dense(), patch.deltas[name].dense())


def test_one_edit_is_stored_as_rank_one_factors(patch):
    for delta in patch.deltas.values():
        assert delta.down is not None and delta.rank == 1


def test_compress_keeps_full_rank_dense():
    full = torch.randn(6, 8)
    assert DeltaWeight.compress(full).down is None
    low = torch.randn(6, 1) @ torch.randn(1, 8)
    compressed = DeltaWeight.compress(low)
    assert compressed.rank == 1
    assert torch.allclose(compressed.dense(), low, atol=1e-5)


def test_other_model_refused_unless_forced(sd1, patch, sd1_dir):
    from emcid.tiny import save_tiny_model

    other = emcid.load_model(save_tiny_model(sd1_dir.parent / "other-seed", "sd1", seed=7))
    with pytest.raises(PatchMismatchError, match="made for model"):
        patch.apply(other)
    patch.apply(other, force=True)


def test_wrong_shapes_and_modules_refused_even_when_forced(sd1, patch):
    name = next(iter(patch.deltas))
    wrong_shape = EditPatch({name: DeltaWeight(torch.zeros(3, 3))}, patch.metadata)
    with pytest.raises(PatchMismatchError, match="weight is"):
        wrong_shape.apply(sd1, force=True)
    no_module = EditPatch({"text_encoder.nothing.here": DeltaWeight(torch.zeros(3, 3))}, patch.metadata)
    with pytest.raises(PatchMismatchError, match="no module"):
        no_module.apply(sd1, force=True)


def test_patch_twice_is_refused_and_merge_stacks(sd1, patch):
    second = emcid.edit(sd1, [emcid.EditRequest("zebra", "horse")], progress=False,
                        **{**FAST, "steps": 5})
    patch.apply(sd1)
    with pytest.raises(PatchMismatchError):
        second.apply(sd1)  # the model is no longer the one `second` was computed on
    patch.revert(sd1)
    merged = patch.merge(second)
    assert len(merged.metadata["requests"]) == 2
    name = next(iter(patch.deltas))
    expected = patch.deltas[name].dense() + second.deltas[name].dense()
    assert torch.allclose(merged.deltas[name].dense(), expected, atol=1e-5)


def test_revert_of_unapplied_patch_refused(sd1, patch):
    with pytest.raises(PatchMismatchError, match="not applied"):
        patch.revert(sd1)
