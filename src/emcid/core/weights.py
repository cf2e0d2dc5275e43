"""Writing module weights and putting them back: the one swap/restore helper.

Every weight write in emcid goes through here: a patch applied (:mod:`emcid.patch`), Stage II
updating layers while it reads later ones, ReFACT's sequential edits, debias trying mixing
factors, a patched model's base weights loaded for its statistics. :func:`restored` puts the
weights back bit for bit (copies, not subtracted deltas).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .bundle import ModelBundle


def current_weights(bundle: ModelBundle, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the weights of ``names`` (module names, ``text_encoder....mlp.fc2``)."""
    return {name: bundle.module(name).weight.detach().clone() for name in names}


@torch.no_grad()
def load_weights(bundle: ModelBundle, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (by module name) into the model."""
    for name, weight in weights.items():
        target = bundle.module(name).weight
        target.copy_(weight.to(target))


@torch.no_grad()
def add_weights(bundle: ModelBundle, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """Add ``scale * delta`` to each named module's weight (cast to the weight's dtype)."""
    for name, delta in deltas.items():
        weight = bundle.module(name).weight
        weight.add_((delta if scale == 1.0 else scale * delta).to(weight))


@contextmanager
def restored(bundle: ModelBundle, names: Iterable[str]) -> Iterator[None]:
    """The weights of ``names`` may change inside the block; on leaving (errors included) they
    hold their values from entry again, bit for bit."""
    saved = current_weights(bundle, names)
    try:
        yield
    finally:
        load_weights(bundle, saved)


@contextmanager
def deltas_applied(bundle: ModelBundle, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add weight deltas for the duration of the block; the weights are restored bit for bit."""
    with restored(bundle, deltas):
        add_weights(bundle, deltas)
        yield
