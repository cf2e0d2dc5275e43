import json

import pytest
import torch
from edit_helpers import FAST, assert_same_state, model_state

import emcid
from emcid import EditPatch
from emcid.errors import PatchFileError, PatchMismatchError
from emcid.patch import DeltaWeight, revert_last, save_pipeline


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


def test_applied_reverts_after_the_block_even_on_an_error(sd1, patch):
    original = _fc2_weights(sd1)
    with patch.applied(sd1):
        inside = _fc2_weights(sd1)
    assert any(not torch.equal(original[n], inside[n]) for n in original)
    assert all(torch.equal(w, original[n]) for n, w in _fc2_weights(sd1).items())
    with pytest.raises(RuntimeError, match="drawing failed"), patch.applied(sd1):
        raise RuntimeError("drawing failed")
    assert all(torch.equal(w, original[n]) for n, w in _fc2_weights(sd1).items())
    assert not sd1.chain.applied


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


def _header_end(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def test_checksum_survives_save_and_load(tmp_path, patch):
    loaded = EditPatch.load(patch.save(tmp_path / "p.safetensors"))
    assert loaded.checksum == patch.checksum
    patch.metadata["requests"][0]["source"] = "carp"
    assert loaded.checksum != patch.checksum  # the metadata is covered too


@pytest.mark.parametrize("where", ["data start", "data end", "header middle"])
def test_four_flipped_bytes_refused(tmp_path, patch, where):
    path = patch.save(tmp_path / "p.safetensors")
    raw = bytearray(path.read_bytes())
    end = _header_end(raw)
    offset = {"data start": end, "data end": len(raw) - 4, "header middle": end // 2}[where]
    for i in range(offset, offset + 4):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PatchFileError):
        EditPatch.load(path)


def test_bad_patch_files_are_clear_errors(tmp_path, patch, sd1_dir):
    good = patch.save(tmp_path / "p.safetensors").read_bytes()
    cases = {
        "missing.safetensors": (None, "does not exist"),
        "empty.safetensors": (b"", "empty"),
        "truncated.safetensors": (good[: len(good) - 100], "truncated or corrupted"),
        "half-header.safetensors": (good[: _header_end(good) // 2], "truncated or corrupted"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(PatchFileError, match=message):
            EditPatch.load(tmp_path / name)
    torch.save({"x": torch.zeros(2)}, tmp_path / "pickle.pt")
    with pytest.raises(PatchFileError, match="pickle"):
        EditPatch.load(tmp_path / "pickle.pt")
    with pytest.raises(PatchFileError, match="not an emcid patch"):
        EditPatch.load(sd1_dir / "text_encoder" / "model.safetensors")


def test_non_finite_or_foreign_tensors_refused(tmp_path, patch):
    name = next(iter(patch.deltas))
    nan = EditPatch({name: DeltaWeight(torch.full((4, 4), float("nan")))}, patch.metadata)
    with pytest.raises(PatchFileError, match="NaN"):
        EditPatch.load(nan.save(tmp_path / "nan.safetensors"))
    from emcid.cache import save_tensors_atomic

    text = json.dumps(patch.metadata)
    save_tensors_atomic(tmp_path / "odd.safetensors", {"unet.conv.weight": torch.zeros(2, 2)},
                        {"emcid": text}, extra=text)
    with pytest.raises(PatchFileError, match="not an emcid weight delta"):
        EditPatch.load(tmp_path / "odd.safetensors")


def _random_patch(bundle, seed: int) -> EditPatch:
    """A rank-one delta on two fc2 modules, made for the model as it is now."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in (1, 2):
        name = bundle.slot("text_encoder").fc2_name(layer)
        out_features, in_features = bundle.module(name).weight.shape
        deltas[name] = DeltaWeight(torch.randn(out_features, 1, generator=generator),
                                   torch.randn(1, in_features, generator=generator))
    return EditPatch(deltas, {"base_fingerprint": bundle.fingerprint(), "method": "test",
                              "requests": [{"source": f"concept {seed}"}]})


def test_chain_of_two_patches_reverts_last_first_bit_exact(tmp_path, sd1, patch):
    original = model_state(sd1)
    patch.apply(sd1)
    after_first = model_state(sd1)
    second = _random_patch(sd1, 1)
    second.apply(sd1)  # made for the patched model: a sequential edit
    folder = save_pipeline(sd1, tmp_path / "two")
    chained = emcid.load_model(folder)
    assert [s["sha256"] for s in chained.history] == [patch.checksum, second.checksum]
    assert chained.history[1]["sources"] == second.sources == ["concept 1"]
    assert_same_state(model_state(chained), model_state(sd1))
    with pytest.raises(PatchMismatchError, match="last first: revert step 2 of 2"):
        revert_last(chained, patch)
    with pytest.raises(PatchMismatchError, match="not among the 2 patches"):
        revert_last(chained, _random_patch(chained, 2))
    assert revert_last(chained, second)["sha256"] == second.checksum
    assert_same_state(model_state(chained), after_first)
    one = emcid.load_model(save_pipeline(chained, tmp_path / "one"))
    assert [s["sha256"] for s in one.history] == [patch.checksum]
    revert_last(one)
    assert_same_state(model_state(one), original)
    with pytest.raises(PatchMismatchError, match="no recorded patch"):
        revert_last(one)


def test_revert_refused_when_folder_weights_changed(tmp_path, sd1, patch):
    patch.apply(sd1)
    chained = emcid.load_model(save_pipeline(sd1, tmp_path / "patched"))
    chained.module(next(iter(patch.deltas))).weight.data.mul_(2)
    with pytest.raises(PatchMismatchError, match="changed after emcid wrote it"):
        revert_last(chained)


def test_save_pipeline_refuses_the_model_folder(tmp_path, sd1_dir):
    import shutil

    model_dir = shutil.copytree(sd1_dir, tmp_path / "model")
    bundle = emcid.load_model(model_dir)
    _random_patch(bundle, 3).apply(bundle)
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    for target in (model_dir, model_dir / "inside", tmp_path):
        with pytest.raises(PatchFileError, match="would overwrite the model"):
            save_pipeline(bundle, target)
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(PatchFileError, match="not a pipeline folder"):
        save_pipeline(bundle, tmp_path / "notes")
    out = save_pipeline(bundle, tmp_path / "edited")
    save_pipeline(bundle, out)  # an earlier output is replaced whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_header_length_starting_like_a_pickle_still_loads(tmp_path, patch):
    """A safetensors header length whose low byte is 0x80 must not be taken for a pickle."""
    for pad in range(64):
        patch.metadata["note"] = "x" * (8 * pad)
        path = patch.save(tmp_path / "p.safetensors")
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert EditPatch.load(path).checksum == patch.checksum
