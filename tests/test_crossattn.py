"""TIME and UCE baselines: closed forms, and end to end through the common Editor interface."""

import pytest
import torch

import emcid
from emcid.editors.crossattn import closed_form_projection, cross_attention_projections, subject_embeddings


def test_closed_form_equals_least_squares():
    """W' minimises ||W' S^T - V*^T||^2 + lam ||W' - W||^2 + p ||(W' - W) P^T||^2."""
    torch.manual_seed(0)
    out_dim, width, lam, scale = 5, 7, 0.3, 2.0
    weight = torch.randn(out_dim, width, dtype=torch.float64)
    sources, dests, kept = (torch.randn(n, width, dtype=torch.float64) for n in (3, 3, 2))
    delta = closed_form_projection(weight, sources, dests, kept, lam, scale)
    targets = dests @ weight.T
    # rows: edits (S -> V*), the regulariser (sqrt(lam) I -> sqrt(lam) W^T), preserved (P -> P W^T)
    design = torch.cat([sources, lam ** 0.5 * torch.eye(width, dtype=torch.float64), scale ** 0.5 * kept])
    goal = torch.cat([targets, lam ** 0.5 * weight.T, scale ** 0.5 * kept @ weight.T])
    direct = torch.linalg.lstsq(design, goal).solution.T
    assert torch.allclose(weight + delta, direct, atol=1e-9)


@pytest.mark.parametrize("method", ["time", "uce"])
def test_edit_maps_source_to_destination_projection(sd1, method):
    request = emcid.EditRequest("lobster", "crab")
    options = {"lam": 1e-4}
    if method == "uce":
        options["preserve"] = ["dog", "otter"]
    src = subject_embeddings(sd1, request.source_prompts(), [request.source] * 3, list(request.prompts))
    dst = subject_embeddings(sd1, request.destination_prompts(), [request.destination] * 3,
                             list(request.prompts))
    kept = subject_embeddings(sd1, ["dog", "otter"], ["dog", "otter"], ["{}", "{}"])
    projections = cross_attention_projections(sd1, edit_keys=True)
    before = {n: m.weight.detach().double().clone() for n, m in projections.items()}
    patch = emcid.edit(sd1, [request], method=method, progress=False, **options)
    assert set(patch.deltas) == set(projections) and patch.metadata["method"] == method
    patch.apply(sd1)
    for name, module in projections.items():
        new, old = module.weight.detach().double(), before[name]
        mapped_error = (src @ new.T - dst @ old.T).norm() / (dst @ old.T).norm()
        assert mapped_error < 0.05, (name, mapped_error)
        if method == "uce":
            kept_change = (kept @ new.T - kept @ old.T).norm() / (kept @ old.T).norm()
            assert kept_change < 0.05, (name, kept_change)
    patch.revert(sd1)
    assert all(torch.equal(m.weight.double(), before[n]) for n, m in projections.items())


def test_time_has_no_preservation_set(sd1):
    with pytest.raises(emcid.EmcidError, match="no preservation"):
        emcid.edit(sd1, [emcid.EditRequest("lobster", "crab")], method="time", preserve=["dog"])
    with pytest.raises(emcid.EmcidError, match="unknown uce options"):
        emcid.edit(sd1, [emcid.EditRequest("lobster", "crab")], method="uce", steps=3)


def test_sdxl_cross_attention_edit(sdxl):
    """On SDXL (keys: both encoders' states, concatenated) the edited projections map the
    source's conditioning to what the unedited ones made of the destination's."""
    request = emcid.EditRequest("lobster", "crab")
    src = subject_embeddings(sdxl, request.source_prompts(), [request.source] * 3, list(request.prompts))
    dst = subject_embeddings(sdxl, request.destination_prompts(), [request.destination] * 3,
                             list(request.prompts))
    projections = cross_attention_projections(sdxl, edit_keys=True)
    before = {n: m.weight.detach().double().clone() for n, m in projections.items()}
    patch = emcid.edit(sdxl, [request], method="uce", progress=False, lam=1e-4)
    assert set(patch.deltas) == set(projections)
    patch.apply(sdxl)
    for name, module in projections.items():
        old, new = before[name], module.weight.detach().double()
        goal = dst @ old.T
        assert (src @ new.T - goal).norm() < 0.05 * goal.norm(), name
        assert (src @ old.T - goal).norm() > 0.2 * goal.norm(), name  # the edit had work to do
