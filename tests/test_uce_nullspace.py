"""UCE with ``projection="nullspace"`` (after SPEED and AlphaEdit): the closed form equals a
direct constrained least-squares solve, the preserved keys keep their outputs, the edited
concept still moves, ``projection="none"`` is UCE as before bit for bit, and bad settings are
refused in one line."""

import math

import pytest
import torch

import emcid
from emcid.editors import editor_from_patch, get_editor
from emcid.editors.crossattn import (
    closed_form_update,
    cross_attention_projections,
    edit_embeddings,
    subject_embeddings,
)
from emcid.editors.uce import paper_keys, prompt_states, tensor_targets

KEPT = ["dog", "otter", "goldfish"]
REQUESTS = [emcid.EditRequest("lobster", "crab"), emcid.EditRequest("tench", "")]


@pytest.fixture(scope="module")
def bundle(sd1_dir):
    """One tiny SD-1.x model for the tests that only read its weights."""
    return emcid.load_model(sd1_dir)


def _preserved(bundle, variant: str, preserve: list[str]) -> torch.Tensor:
    """The rows UCE keeps, written out: v2025 the concepts' "{}" subject token, paper every token
    of the preserved prompts (the empty prompt when none are given)."""
    if variant == "v2025":
        if not preserve:
            return torch.zeros(0, bundle.encode([""]).embeds.shape[-1], dtype=torch.float64)
        return subject_embeddings(bundle, preserve, preserve, ["{}"] * len(preserve))
    states, _ = prompt_states(bundle, preserve or [""])
    return states.reshape(-1, states.shape[-1])


def _edits(bundle, variant: str, requests, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, target values) of the edits for one projection's ``weight``."""
    if variant == "v2025":
        sources, destinations = edit_embeddings(bundle, requests)
        return sources, destinations @ weight.T
    sources, destinations, owner = paper_keys(bundle, requests)
    return sources, tensor_targets(sources @ weight.T, destinations @ weight.T, owner)


def _free_basis(preserved: torch.Tensor, threshold: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(preserved.T @ preserved)
    return vectors[:, values < threshold * values.max()]


def _direct(weight, keys, values, preserved, basis, lam, erase, keep) -> torch.Tensor:
    """min over D = G U^T of e ||D K^T - R||^2 + lam ||D||^2 + p ||D P^T||^2 (R = V^T - W K^T),
    stacked: with D^T = U X, the rows [sqrt(e) K; sqrt(lam) I; sqrt(p) P] U X against
    [sqrt(e) R^T; 0; 0], solved by lstsq in the free-space coordinates X."""
    width, out = weight.shape[1], weight.shape[0]
    design = torch.cat([erase ** 0.5 * keys, lam ** 0.5 * torch.eye(width, dtype=torch.float64),
                        keep ** 0.5 * preserved]) @ basis
    goal = torch.cat([erase ** 0.5 * (values - keys @ weight.T),
                      torch.zeros(width + preserved.shape[0], out, dtype=torch.float64)])
    return (basis @ torch.linalg.lstsq(design, goal).solution).T


@pytest.mark.parametrize(("variant", "preserve", "threshold"),
                         [("v2025", KEPT, 0.1), ("paper", [], 1e-2), ("paper", ["dog"], 1e-3)])
def test_closed_form_equals_a_direct_constrained_solve(bundle, variant, preserve, threshold):
    editor = get_editor("uce", variant=variant, preserve=preserve, projection="nullspace",
                        nullspace_threshold=threshold)
    config = editor.config
    preserved = _preserved(bundle, variant, preserve)
    basis = _free_basis(preserved, threshold)
    assert 0 < basis.shape[1] < preserved.shape[1]
    deltas = editor.compute(bundle, REQUESTS, progress=False)
    for name, module in cross_attention_projections(bundle, edit_keys=True).items():
        weight = module.weight.detach().double()
        keys, values = _edits(bundle, variant, REQUESTS, weight)
        direct = _direct(weight, keys, values, preserved, basis, config.lam, config.erase_scale,
                         config.preserve_scale)
        assert (deltas[name].double() - direct).abs().max() <= 1e-5 * direct.abs().max(), name


@pytest.mark.parametrize(("variant", "preserve"), [("v2025", KEPT), ("paper", [])])
def test_preserved_keys_keep_their_outputs(sd1, variant, preserve):
    """W' k == W k for the keys in the preserved span (v2025: the preserved concepts' own keys,
    all above the threshold); without the projection they move."""
    threshold = 1e-2
    preserved = _preserved(sd1, variant, preserve)
    values, vectors = torch.linalg.eigh(preserved.T @ preserved)
    span = vectors[:, values >= threshold * values.max()].T
    probes = preserved if variant == "v2025" else span
    if variant == "v2025":
        assert span.shape[0] == len(KEPT)
    options = {"variant": variant, "preserve": preserve, "progress": False}
    projections = cross_attention_projections(sd1, edit_keys=True)
    before = {n: m(probes.float()).double() for n, m in projections.items()}
    loose = emcid.edit(sd1, REQUESTS, method="uce", **options)
    patch = emcid.edit(sd1, REQUESTS, method="uce", projection="nullspace", **options)
    patch.apply(sd1)
    with torch.no_grad():
        for name, module in projections.items():
            old, new = before[name], module(probes.float()).double()
            assert (new - old).abs().max() <= 1e-5 * old.abs().max(), name
            moved = probes @ loose.deltas[name].dense().double().T
            assert moved.abs().max() > 1e-3 * old.abs().max(), name


def test_the_edited_concept_still_moves(sd1):
    request = emcid.EditRequest("lobster", "")
    options = {"preserve": KEPT, "projection": "nullspace", "nullspace_threshold": 0.05, "lam": 1e-3}
    keys, _ = edit_embeddings(sd1, [request])
    projections = cross_attention_projections(sd1, edit_keys=True)
    targets = {n: _edits(sd1, "v2025", [request], m.weight.detach().double())[1]
               for n, m in projections.items()}
    patch = emcid.edit(sd1, [request], method="uce", progress=False, **options)
    hparams = patch.metadata["hparams"]
    assert (hparams["projection"], hparams["nullspace_threshold"]) == ("nullspace", 0.05)
    assert editor_from_patch(patch).config == get_editor("uce", **options).config
    gaps = {n: (keys @ m.weight.detach().double().T - targets[n]).norm() for n, m in projections.items()}
    patch.apply(sd1)
    for name, module in projections.items():
        after = (keys @ module.weight.detach().double().T - targets[name]).norm()
        assert after < 0.5 * gaps[name], (name, float(after), float(gaps[name]))


@pytest.mark.parametrize(("variant", "preserve"), [("v2025", []), ("v2025", KEPT), ("paper", ["dog"])])
def test_projection_none_is_uce_bit_for_bit(bundle, variant, preserve):
    """The closed form as UCE computed it before the option (one call per projection)."""
    editor = get_editor("uce", variant=variant, preserve=preserve, projection="none",
                        nullspace_threshold=0.3)
    assert get_editor("uce").hparams()["projection"] == "none"
    config = editor.config
    preserved = _preserved(bundle, variant, preserve)
    deltas = editor.compute(bundle, REQUESTS, progress=False)
    for name, module in cross_attention_projections(bundle, edit_keys=True).items():
        weight = module.weight.detach().double()
        keys, values = _edits(bundle, variant, REQUESTS, weight)
        want = closed_form_update(weight, keys, values, preserved, config.lam, config.erase_scale,
                                  config.preserve_scale).float()
        assert torch.equal(deltas[name], want), name


def _refusal(match: str, **options) -> None:
    with pytest.raises(emcid.EmcidError, match=match) as caught:
        get_editor("uce", **options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5, math.nan, "0.1"])
def test_a_threshold_outside_zero_one_is_refused(threshold):
    _refusal("nullspace_threshold", preserve=KEPT, projection="nullspace", nullspace_threshold=threshold)


def test_other_bad_settings_are_refused(bundle):
    _refusal(r"projection=.*choose from none, nullspace", projection="null")
    _refusal("give some", projection="nullspace")  # v2025 preserves nothing else
    # preserved keys that span every direction equally leave no free space: refused, not a no-op
    editor = get_editor("uce", variant="paper", projection="nullspace", nullspace_threshold=0.5)
    with pytest.raises(emcid.EmcidError, match="leave no free space") as caught:
        editor.solver(torch.eye(32, dtype=torch.float64))
    assert "\n" not in str(caught.value)
