"""ReFACT baseline: the rank-one closed form, and end to end through the Editor interface."""

import pytest
import torch

import emcid
from emcid.editors.refact import default_layer, rank_one_update

REQUESTS = [emcid.EditRequest("lobster", "crab", seed=1), emcid.EditRequest("otter", "dog", seed=2)]
FAST = {"steps": 30, "stats_samples": 300}


def test_rank_one_update_writes_the_value_and_spares_c_orthogonal_keys():
    torch.manual_seed(0)
    width, out = 9, 4
    basis = torch.randn(width, width, dtype=torch.float64)
    second_moment = basis @ basis.T + torch.eye(width, dtype=torch.float64)
    key, key_mean, delta = torch.randn(width), torch.randn(width), torch.randn(out)
    update = rank_one_update(key, key_mean, delta, second_moment)
    assert update.shape == (out, width) and torch.linalg.matrix_rank(update) == 1
    torch.testing.assert_close(update @ key.double(), delta.double())
    # Any key x with x . C^{-1} k_mean = 0 is left exactly where it was.
    direction = torch.linalg.solve(second_moment, key_mean.double())
    other = torch.randn(width, dtype=torch.float64)
    other = other - (other @ direction) / (direction @ direction) * direction
    assert (update @ other).abs().max() < 1e-9


def _destination_probability(bundle, request, words):
    """ReFACT's own score: softmax over -L2 distances to the unedited destination / source words."""
    with torch.no_grad():
        pooled = bundle.encode(request.source_prompts()).pooled[0]
    return torch.softmax(-torch.cdist(pooled, words), dim=1)[:, 0].mean()


def test_edit_moves_sources_towards_destinations_in_one_fc2(sd1):
    with torch.no_grad():
        words = [sd1.encode([r.destination, r.source]).pooled[0] for r in REQUESTS]
    before = [_destination_probability(sd1, r, w) for r, w in zip(REQUESTS, words)]
    weights = {n: p.detach().clone() for n, p in sd1.pipeline.text_encoder.named_parameters()}
    patch = emcid.edit(sd1, REQUESTS, method="refact", progress=False, **FAST)
    assert set(patch.deltas) == {sd1.slot("text_encoder").fc2_name(default_layer(sd1))}
    assert patch.metadata["method"] == "refact"
    # compute() leaves the live model as it found it; the patch carries the edit.
    assert all(torch.equal(p, weights[n]) for n, p in sd1.pipeline.text_encoder.named_parameters())
    patch.apply(sd1)
    after = [_destination_probability(sd1, r, w) for r, w in zip(REQUESTS, words)]
    for was, now in zip(before, after):
        assert now > was + 0.1, (was, now)
    patch.revert(sd1)


def test_bad_options(sd1):
    with pytest.raises(ValueError, match="unknown refact options"):
        emcid.edit(sd1, REQUESTS[:1], method="refact", lam=3.0)
    with pytest.raises(ValueError, match="refact layer"):
        emcid.edit(sd1, REQUESTS[:1], method="refact", layer=99, progress=False)


def test_sdxl_refact_edits_both_encoders(sdxl):
    patch = emcid.edit(sdxl, REQUESTS[:1], method="refact", progress=False, **FAST)
    assert {name.split(".")[0] for name in patch.deltas} == {"text_encoder", "text_encoder_2"}
