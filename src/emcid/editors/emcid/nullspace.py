"""Stage II restricted to the free space of the preserved keys (``projection="nullspace"``).

The preserved keys' statistics ``C = E[k k^T]`` have a few large eigenvalues (the directions
the model's other prompts use) and many small ones. The update is written as ``D = G U^T``,
with ``U`` an orthonormal basis of the eigenvectors of ``C`` whose eigenvalue is below
``threshold`` times the largest (and, for a sequential edit, orthogonal to the keys of the
concepts earlier patches edited), so ``D k = 0`` for every key in the preserved directions.
Within that space, ``G`` minimises Stage II's own objective,

    lam (1-a) tr(G U^T C U G^T) + a ||G U^T K - R||^2,
    G = a R K^T U (lam (1-a) U^T C U + a U^T K K^T U)^+,

solved as today's closed form is, in the free space's coordinates (docs/method.md, "Stage II
in the null space").
"""

from __future__ import annotations

import torch

from ...core.cache import TensorCache, tensors_checksum
from ...errors import OptionError
from .solve import closed_form_update


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


def free_space(name: str, values: torch.Tensor, vectors: torch.Tensor, threshold: float,
               protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The directions the update may use, as orthonormal columns ``U`` (d_in, f), and
    ``U^T C U`` (f, f): eigenvectors of C below ``threshold`` of its largest eigenvalue, less
    the span of the ``protected`` keys (d_in, p). Without protected keys ``U^T C U`` is the
    diagonal of their eigenvalues, so the system costs one Cholesky, as today's does."""
    chosen = values < threshold * values.max()
    free, reduced = vectors[:, chosen], torch.diag(values[chosen])
    if protected is not None and protected.numel() and free.shape[1]:
        # The free directions no protected key reaches: the last columns of a complete QR of
        # U^T K_protected (a Householder product: O(f^2 p), not the O(f^3) of an SVD).
        reach = free.T @ protected.double()
        q, _ = torch.linalg.qr(reach, mode="complete")
        kept = q[:, min(reach.shape):]
        free, reduced = free @ kept, (kept.T * values[chosen]) @ kept
    if free.shape[1] == 0:
        smallest = float(values.min() / values.max())
        raise OptionError(f"projection=nullspace: the statistics of {name} leave no free space at "
                          f"nullspace_threshold={threshold:g} (its smallest eigenvalue is "
                          f"{smallest:.2e} of its largest): raise the threshold")
    return free, reduced


def projected_update(keys: torch.Tensor, residuals: torch.Tensor, basis: torch.Tensor,
                     reduced: torch.Tensor, lam: float, alpha: float) -> torch.Tensor:
    """``D = G U^T`` of the module doc, (d_out, d_in) float64: Stage II's closed form on the
    keys' coordinates in the free space (keys (d_in, e), residuals (d_out, e), basis ``U``
    (d_in, f), ``reduced = U^T C U``)."""
    g = closed_form_update(basis.T @ keys.double(), residuals, reduced, lam, alpha)
    return g @ basis.T
