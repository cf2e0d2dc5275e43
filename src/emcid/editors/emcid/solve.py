"""Stage II's closed form, the one linear solve every fc2 update is (docs/method.md, Stage II)."""

from __future__ import annotations

import torch

SOLVE_RTOL = 1e-10  # eigenvalues of a singular system below this fraction of its largest count as zero


def closed_form_update(
    keys: torch.Tensor, residuals: torch.Tensor, second_moment: torch.Tensor, lam: float,
    alpha: float, held: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a R K^T (lam (1-a) C + a K K^T + a P P^T)^{-1}`` by a float64 linear solve (Cholesky).

    keys: (d_in, e); residuals: (d_out, e); second_moment: (d_in, d_in); ``held`` (d_in, p):
    keys ``P`` whose outputs the update keeps, weighed as edits are (earlier batches' keys in
    a sequential edit). Returns (d_out, d_in).
    """
    k = keys.double()
    system = lam * (1 - alpha) * second_moment.double() + alpha * k @ k.T
    if held is not None and held.numel():
        system = system + alpha * held.double() @ held.double().T
    rhs = k @ residuals.double().T
    # The system is symmetric, so Delta^T = a * system^{-1} K R^T. It is positive definite
    # unless C is singular there (lam > 0 always): Cholesky where it succeeds, else the
    # minimum-norm solution (directions that hold neither keys nor statistics stay unwritten).
    factor, info = torch.linalg.cholesky_ex(system)
    solution = torch.cholesky_solve(rhs, factor) if int(info) == 0 else _min_norm_solve(system, rhs)
    return (alpha * solution).T


def _min_norm_solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``system^+ rhs`` for a symmetric positive semi-definite system (eigenvalues below
    ``SOLVE_RTOL`` of the largest count as zero)."""
    values, vectors = torch.linalg.eigh(system)
    inverse = torch.where(values > SOLVE_RTOL * values.max(), 1 / values, torch.zeros_like(values))
    return (vectors * inverse) @ (vectors.T @ rhs)
