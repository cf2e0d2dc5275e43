import torch

from emcid.editors.emcid.stage2 import closed_form_update


def test_closed_form_equals_least_squares():
    """Delta minimises lam (1-a) tr(D C D^T) + a ||D K - R||^2, solved here directly."""
    torch.manual_seed(0)
    d_in, d_out, edits, lam, alpha = 12, 5, 3, 7.0, 0.6
    samples = torch.randn(40, d_in, dtype=torch.float64)
    second = samples.T @ samples / 40
    keys = torch.randn(d_in, edits, dtype=torch.float64)
    residuals = torch.randn(d_out, edits, dtype=torch.float64)
    delta = closed_form_update(keys, residuals, second, lam, alpha)
    # Stack both terms as one least-squares system in D^T: rows sqrt(w) C^{1/2} and sqrt(a) K^T.
    root = torch.linalg.cholesky(second)  # C = L L^T, so tr(D C D^T) = ||D L||^2
    design = torch.cat([(lam * (1 - alpha)) ** 0.5 * root.T, alpha ** 0.5 * keys.T])
    target = torch.cat([torch.zeros(d_in, d_out, dtype=torch.float64), alpha ** 0.5 * residuals.T])
    direct = torch.linalg.lstsq(design, target).solution.T
    assert torch.allclose(delta, direct, atol=1e-10)


def test_weak_preservation_writes_the_residual_exactly():
    torch.manual_seed(1)
    keys = torch.randn(8, 2, dtype=torch.float64)
    residuals = torch.randn(4, 2, dtype=torch.float64)
    delta = closed_form_update(keys, residuals, torch.eye(8, dtype=torch.float64), 1e-9, 0.5)
    assert torch.allclose(delta @ keys, residuals, atol=1e-6)
    # with real preservation the update is still limited to rank = number of edits
    delta = closed_form_update(keys, residuals, torch.eye(8, dtype=torch.float64), 1.0, 0.5)
    assert torch.linalg.matrix_rank(delta) == 2


def test_keys_read_without_padding_equal_the_padded_encoding(sdxl):
    """Stage II encodes each prompt only up to its subject token (the encoders are causal):
    keys and block outputs there must equal those of the pipeline's full padded encoding."""
    from emcid.editors.emcid.stage2 import _KeyReader
    from emcid.hooks import capture
    from emcid.requests import subject_positions

    templates = ["a photo of {} at night", "{}", "an old painting of a {} by the sea"]
    for slot_name in ("text_encoder", "text_encoder_2"):
        slot = sdxl.slot(slot_name)
        prompts = [t.format("goldfish") for t in templates] * 2
        positions = subject_positions(slot.tokenizer, templates * 2, "goldfish")
        fc2, block = slot.fc2(1), slot.block(2)
        keys, current = _KeyReader(sdxl, slot_name, prompts, positions, 2).read(1, block, 2)
        with torch.no_grad(), capture({"k": fc2}, positions, "input") as k, \
                capture({"c": block}, positions) as c:
            slot.encoder(slot.tokenize(prompts))
        assert torch.allclose(keys, k["k"][0], atol=1e-5)
        assert torch.allclose(current, c["c"][0], atol=1e-5)


def _three_targets():
    import emcid
    from emcid.editors.emcid.stage1 import ConceptTarget

    torch.manual_seed(0)
    return [ConceptTarget(emcid.EditRequest(source, "crab"), {"text_encoder": 2},
                          {"text_encoder": torch.randn(32)}, {"text_encoder": torch.randn(3, 32)}, 0.0)
            for source in ("lobster", "owl", "otter")]


def test_replaying_the_unchanged_blocks_changes_no_delta(sd1, monkeypatch):
    """Stage II reruns only the blocks from the last updated one; the full encoder agrees."""
    from contextlib import nullcontext

    from emcid.editors.emcid import stage2

    layers = {"text_encoder": [0, 1, 2]}
    targets = _three_targets()
    width = sd1.slot("text_encoder").fc2(0).in_features
    moments = {sd1.slot("text_encoder").fc2_name(i): torch.eye(width) for i in range(3)}
    for residual in ("memit", "release"):
        config = stage2.Stage2Config(lam=1.0, residual=residual)
        fast = stage2.compute_deltas(sd1, targets, layers, moments, config, progress=False)
        with monkeypatch.context() as patched:
            patched.setattr(stage2, "replay_prefix", lambda *a: nullcontext())
            full = stage2.compute_deltas(sd1, targets, layers, moments, config, progress=False)
        for name, delta in full.items():
            assert delta.abs().max() > 0
            assert torch.allclose(fast[name], delta, atol=1e-5), (residual, name)


def test_closed_form_without_a_positive_definite_system_falls_back_to_lu():
    """Rounding can leave C slightly indefinite: Cholesky fails there, the LU solve does not."""
    second = torch.diag(torch.tensor([1.0, 2.0, 1.0, -1e-3], dtype=torch.float64))
    keys = torch.tensor([[1.0], [0.5], [0.0], [0.0]], dtype=torch.float64)
    residuals = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    system = 3.0 * 0.5 * second + 0.5 * keys @ keys.T
    expected = (0.5 * torch.linalg.solve(system, keys @ residuals.T)).T
    assert torch.allclose(closed_form_update(keys, residuals, second, 3.0, 0.5), expected)


def test_a_singular_system_gets_the_minimum_norm_update():
    """C = 0 (no statistics in any direction): the edit equations alone, solved exactly and
    writing nothing outside the keys' span (the null-space projection relies on it)."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    residuals = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    delta = closed_form_update(keys, residuals, torch.zeros(16, 16), lam=2.0, alpha=0.5)
    assert torch.allclose(delta @ keys, residuals, atol=1e-8)
    assert torch.allclose(delta, residuals @ torch.linalg.pinv(keys), atol=1e-8)


def test_holding_earlier_keys_makes_two_batches_solve_as_one():
    """Recursive least squares: batch 2 solved on the model batch 1 updated, its residuals
    read there and batch 1's keys held with the edits' weight, gives one batch's update."""
    torch.manual_seed(2)
    d_in, d_out, lam, alpha = 10, 4, 5.0, 0.6
    samples = torch.randn(30, d_in, dtype=torch.float64)
    second = samples.T @ samples / 30
    k1, k2 = torch.randn(d_in, 3, dtype=torch.float64), torch.randn(d_in, 2, dtype=torch.float64)
    r1, r2 = torch.randn(d_out, 3, dtype=torch.float64), torch.randn(d_out, 2, dtype=torch.float64)
    together = closed_form_update(torch.cat([k1, k2], 1), torch.cat([r1, r2], 1), second, lam, alpha)
    first = closed_form_update(k1, r1, second, lam, alpha)
    then = closed_form_update(k2, r2 - first @ k2, second, lam, alpha, held=k1)
    assert torch.allclose(first + then, together, atol=1e-10)
    alone = closed_form_update(k2, r2 - first @ k2, second, lam, alpha)
    assert not torch.allclose(first + alone, together, atol=1e-3)  # without holding, it is not


def test_lam_edits_weighs_the_statistics_by_the_number_of_edits(sd1):
    from emcid.editors.emcid import stage2

    layers = {"text_encoder": [1, 2]}
    width = sd1.slot("text_encoder").fc2(0).in_features
    moments = {sd1.slot("text_encoder").fc2_name(i): torch.eye(width) for i in (1, 2)}
    targets = _three_targets()

    def deltas(**options):
        config = stage2.Stage2Config(**options)
        return stage2.compute_deltas(sd1, targets, layers, moments, config, progress=False)

    scaled = deltas(lam=0.5, lam_edits=1)  # three edits, lam calibrated for one: lam 1.5
    fixed = deltas(lam=1.5)
    unscaled = deltas(lam=0.5, lam_edits=3)  # lam holds for up to three edits
    floor = deltas(lam=0.5)
    for name, delta in scaled.items():
        assert torch.allclose(delta, fixed[name], atol=1e-6), name
        assert torch.equal(unscaled[name], floor[name]), name
        assert not torch.allclose(delta, floor[name], atol=1e-4), name
    assert stage2.Stage2Config(lam=4000.0, lam_edits=50).lam_for(1000) == 80000.0


def test_lam_edits_is_recorded_in_the_patch_and_refused_below_zero(sd1):
    import pytest

    from emcid import EditRequest
    from emcid.editors import get_editor
    from emcid.errors import OptionError
    from emcid.tasks.edit import edit_patch

    options = {"layers": {"text_encoder": [1]}, "stats_samples": 8, "cache": False, "steps": 1}
    requests = [EditRequest("lobster", "crab"), EditRequest("owl", "hawk")]
    patch = edit_patch(get_editor("emcid", sd1, lam=1.0, lam_edits=1, **options), sd1, requests,
                       progress=False)
    assert patch.metadata["stage2_lam"] == 2.0
    patch = edit_patch(get_editor("emcid", sd1, lam=1.0, lam_edits=0, **options), sd1, requests,
                       progress=False)
    assert patch.metadata["stage2_lam"] == 1.0
    for bad in (-1, 2.5):
        with pytest.raises(OptionError, match="lam_edits"):
            get_editor("emcid", sd1, lam_edits=bad, **options)
