"""Stage II in the null space of the preserved keys: the closed form equals a direct
constrained least-squares solve, the update leaves the preserved directions and earlier
patches' keys untouched, and bad settings are refused before any work."""

import pytest
import torch
from edit_helpers import FAST

import emcid
from emcid.core.hooks import capture
from emcid.core.stats import second_moments
from emcid.editors.emcid.nullspace import eigen_decomposition, free_space, projected_update
from emcid.errors import OptionError
from emcid.requests import subject_positions

LAM, ALPHA = 3.0, 0.4


@pytest.fixture(scope="module")
def statistics(sd1_dir):
    bundle = emcid.load_model(sd1_dir)
    name = bundle.slot("text_encoder").fc2_name(1)
    return name, second_moments(bundle, [name], sample_count=300, progress=False)[name].double()


def _direct(keys, residuals, second_moment, basis):
    """min over G of lam(1-a) tr(G U^T C U G^T) + a ||G U^T K - R||^2 as one stacked
    least-squares problem (rows: the edit's equations, then C's square root), min-norm."""
    reduced = basis.T @ second_moment @ basis
    values, vectors = torch.linalg.eigh(reduced)
    root = vectors * values.clamp(min=0).sqrt()  # reduced = root @ root.T
    k = basis.T @ keys
    a = torch.cat([ALPHA ** 0.5 * k.T, (LAM * (1 - ALPHA)) ** 0.5 * root.T])
    b = torch.cat([ALPHA ** 0.5 * residuals.T, torch.zeros(root.shape[1], residuals.shape[0],
                                                            dtype=torch.float64)])
    g = torch.linalg.lstsq(a, b, driver="gelsd").solution.T
    return g @ basis.T


def _half_threshold(values):
    """A threshold that frees about half the directions (the tiny model's spectrum)."""
    return float(values[len(values) // 2] / values.max()) * 1.0001


def test_closed_form_equals_a_direct_constrained_solve(statistics):
    name, c = statistics
    values, vectors = eigen_decomposition(c, None)
    basis, reduced = free_space(name, values, vectors, _half_threshold(values))
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(c.shape[0], 6, generator=generator, dtype=torch.float64)
    residuals = torch.randn(32, 6, generator=generator, dtype=torch.float64)
    closed = projected_update(keys, residuals, basis, reduced, LAM, ALPHA)
    direct = _direct(keys, residuals, c, basis)
    assert torch.allclose(closed, direct, rtol=1e-7, atol=1e-9 * direct.abs().max())
    preserved = vectors[:, values >= _half_threshold(values) * values.max()]
    assert preserved.shape[1] > 0
    assert (closed @ preserved).abs().max() < 1e-9 * closed.abs().max()


def test_protected_keys_are_left_alone(statistics):
    name, c = statistics
    values, vectors = eigen_decomposition(c, None)
    generator = torch.Generator().manual_seed(1)
    protected = torch.randn(c.shape[0], 3, generator=generator, dtype=torch.float64)
    threshold = _half_threshold(values)
    basis, reduced = free_space(name, values, vectors, threshold, protected)
    assert basis.shape[1] == free_space(name, values, vectors, threshold)[0].shape[1] - 3
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(reduced, basis.T @ c @ basis, atol=1e-9 * float(c.abs().max()))
    keys = torch.randn(c.shape[0], 4, generator=generator, dtype=torch.float64)
    residuals = torch.randn(32, 4, generator=generator, dtype=torch.float64)
    delta = projected_update(keys, residuals, basis, reduced, LAM, ALPHA)
    assert torch.allclose(delta, _direct(keys, residuals, c, basis), rtol=1e-7,
                          atol=1e-9 * delta.abs().max())
    assert (delta @ protected).abs().max() < 1e-9 * delta.abs().max() * protected.abs().max()


def test_no_free_space_is_refused(statistics):
    name, c = statistics
    values, vectors = eigen_decomposition(c, None)
    with pytest.raises(OptionError, match="leave no free space"):
        free_space(name, values, vectors, float(values.min() / values.max()) * 0.5)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, float("nan")])
def test_a_threshold_outside_zero_one_is_refused(sd1, threshold):
    with pytest.raises(OptionError, match="nullspace_threshold"):
        emcid.edit(sd1, [emcid.EditRequest("tench", "goldfish")], projection="nullspace",
                   nullspace_threshold=threshold, progress=False, **FAST)


def _mean_keys(bundle, layer, requests):
    """fc2 inputs of block ``layer`` at each request's subject token, mean over its prompts."""
    slot = bundle.slot("text_encoder")
    rows = []
    for request in requests:
        positions = subject_positions(slot.tokenizer, list(request.prompts), request.source)
        with torch.no_grad(), capture({"k": slot.fc2(layer)}, positions, "input") as records:
            bundle.encode(request.source_prompts())
        rows.append(records["k"][0].double().mean(0))
    return torch.stack(rows, 1)


def test_a_sequential_nullspace_edit_leaves_the_first_batchs_keys_alone(sd1, statistics):
    first = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("volcano", "beacon")]
    options = {**FAST, "steps": 5, "layers": {"text_encoder": [1, 2]}, "projection": "nullspace",
               "nullspace_threshold": 0.5, "earlier_edits": "hold"}
    emcid.edit(sd1, first, progress=False, **options).apply(sd1)
    second = emcid.edit(sd1, [emcid.EditRequest("church", "castle")], progress=False, **options)
    assert second.metadata["hparams"]["stage2"]["projection"] == "nullspace"
    second.apply(sd1)
    for layer in (1, 2):
        name = sd1.slot("text_encoder").fc2_name(layer)
        delta = second.deltas[name].dense().double()
        kept = _mean_keys(sd1, layer, first)
        assert (delta @ kept).abs().max() < 1e-5 * delta.abs().max() * kept.abs().max()


@pytest.mark.parametrize("earlier_edits", ["hold", "free"])
def test_a_sequential_edit_holds_the_first_batchs_keys_only_when_asked(sd1, earlier_edits):
    """earlier_edits="hold" keeps the first batch's keys' outputs nearly still;
    "free" lets the second update move them as much as any key."""
    first = [emcid.EditRequest("tench", "goldfish"), emcid.EditRequest("volcano", "beacon")]
    options = {**FAST, "steps": 5, "layers": {"text_encoder": [1, 2]}, "lam": 0.05}
    later = [emcid.EditRequest("church", "castle")]
    emcid.edit(sd1, first, progress=False, **options).apply(sd1)
    second = emcid.edit(sd1, later, progress=False, earlier_edits=earlier_edits, **options)
    assert second.metadata["hparams"]["stage2"]["earlier_edits"] == earlier_edits
    name = sd1.slot("text_encoder").fc2_name(1)
    delta = second.deltas[name].dense().double()
    kept, own = _mean_keys(sd1, 1, first), _mean_keys(sd1, 1, later)
    moved = (delta @ kept).norm(dim=0) / kept.norm(dim=0)  # per earlier concept
    written = (delta @ own).norm() / own.norm()
    if earlier_edits == "hold":
        assert float(moved.max()) < 0.1 * float(written)
    else:
        assert float(moved.max()) > 0.1 * float(written)


def test_an_unknown_earlier_edits_choice_is_refused():
    from emcid.editors import get_editor

    with pytest.raises(OptionError, match="earlier_edits"):
        get_editor("emcid", earlier_edits="keep")
