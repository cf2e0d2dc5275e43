"""Stage II restricted to the free space of the preserved keys (``projection="nullspace"``).

The preserved keys' statistics ``C = E[k k^T]`` have a few large eigenvalues (the directions
the model's other prompts use) and many small ones. The update is written as ``D = G U^T``,
with ``U`` an orthonormal basis of the eigenvectors of ``C`` whose eigenvalue is below
``threshold`` times the largest (and, for a sequential edit, orthogonal to the keys of the
concepts earlier patches edited), so ``D k = 0`` for every key in the preserved directions.
Within that space, ``G`` minimises Stage II's own objective,

    lam (1-a) tr(G U^T C U G^T) + a ||G U^T K - R||^2,
    G = a R K^T U (lam (1-a) U^T C U + a U^T K K^T U)^+,

solved by an eigendecomposition with the minimum-norm solution where the system is singular
(docs/method.md, "Stage II in the null space").
"""

from __future__ import annotations

import torch

from ...core.cache import TensorCache, tensors_checksum
from ...errors import OptionError

SOLVE_RTOL = 1e-10  # eigenvalues of the system below this fraction of its largest count as zero


def eigen_decomposition(second_moment: torch.Tensor, cache: TensorCache | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of ``C`` in float64, cached by C's bytes (at
    SD's 3,072-wide keys one costs seconds, and every edit on a model reuses it)."""
    key = tensors_checksum({"C": second_moment})[:32]
    entry = cache.load(key) if cache is not None else None
    if entry is not None:
        return entry[0]["values"].double(), entry[0]["vectors"].double()
    values, vectors = torch.linalg.eigh(second_moment.double())
    if cache is not None:
        cache.save(key, {"values": values, "vectors": vectors})
    return values, vectors


def free_basis(name: str, values: torch.Tensor, vectors: torch.Tensor, threshold: float,
               protected: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal columns spanning the directions the update may use: eigenvectors of C below
    ``threshold`` of its largest eigenvalue, less the span of ``protected`` keys (d_in, p)."""
    free = vectors[:, values < threshold * values.max()]
    if protected is not None and protected.numel() and free.shape[1]:
        # Directions of the free space that no protected key reaches: the left null space of
        # U^T K_protected, mapped back by U.
        left, singular, _ = torch.linalg.svd(free.T @ protected.double(), full_matrices=True)
        rank = int((singular > SOLVE_RTOL ** 0.5 * singular.max()).sum()) if singular.numel() else 0
        free = free @ left[:, rank:]
    if free.shape[1] == 0:
        smallest = float(values.min() / values.max())
        raise OptionError(f"projection=nullspace: the statistics of {name} leave no free space at "
                          f"nullspace_threshold={threshold:g} (its smallest eigenvalue is "
                          f"{smallest:.2e} of its largest): raise the threshold")
    return free


def projected_update(keys: torch.Tensor, residuals: torch.Tensor, second_moment: torch.Tensor,
                     basis: torch.Tensor, lam: float, alpha: float) -> torch.Tensor:
    """``D = G U^T`` of the module doc, (d_out, d_in) float64. keys (d_in, e), residuals
    (d_out, e), basis ``U`` (d_in, f)."""
    k = basis.T @ keys.double()  # the keys' coordinates in the free space, (f, e)
    reduced = basis.T @ second_moment.double() @ basis
    system = lam * (1 - alpha) * reduced + alpha * k @ k.T
    values, vectors = torch.linalg.eigh(system)
    inverse = torch.where(values > SOLVE_RTOL * values.max(), 1 / values, torch.zeros_like(values))
    g = alpha * residuals.double() @ k.T @ (vectors * inverse) @ vectors.T
    return g @ basis.T
