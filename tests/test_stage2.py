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
