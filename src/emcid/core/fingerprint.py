"""The model's content fingerprint: computed once per state of its weights.

The hash samples every tensor, a pass over the whole model (and a device sync per tensor on
a GPU); an edit asks for it several times. Each tensor's version counter (bumped by every
in-place write: a patch applied or reverted, a weight swapped for a while) and storage say
whether the weights changed since the last hash, so it is recomputed only then.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from .family import COMPONENTS

if TYPE_CHECKING:
    from .bundle import ModelBundle


def fingerprint(bundle: ModelBundle, components: tuple[str, ...] = COMPONENTS, sample: int = 4096) -> str:
    """A fast content hash of the model as it is now.

    Hashes the family, every tensor's name, shape and a strided sample of its values (rounded
    to float16, so an fp16 load of the same weights fingerprints alike). Any edit of an fc2
    weight changes nearly every entry, so the sample sees it.
    """
    digest = hashlib.sha256(bundle.family.encode())
    for component in components:
        module = getattr(bundle.pipeline, component, None)
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(flat.numel() // sample, 1)
            values = flat[::step][:sample].to("cpu", torch.float16)
            digest.update(f"{component}.{name}{tuple(tensor.shape)}".encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:24]


def weights_state(bundle: ModelBundle, components: tuple[str, ...]) -> tuple | None:
    """What changes whenever a weight of ``components`` does (None: not tracked, e.g. tensors
    made under ``torch.inference_mode``, which keep no version counter)."""
    state = []
    try:
        for component in components:
            module = getattr(bundle.pipeline, component, None)
            if module is not None:
                state += [(id(module), name, t.data_ptr(), t._version)
                          for name, t in module.state_dict(keep_vars=True).items()]
    except RuntimeError:
        return None
    return tuple(state)


def cached_fingerprint(bundle: ModelBundle, components: tuple[str, ...] = COMPONENTS) -> str:
    """:func:`fingerprint`, reused while no weight of ``components`` has changed."""
    state = weights_state(bundle, components)
    known = bundle.fingerprints.get(components)
    if state is not None and known is not None and known[0] == state:
        return known[1]
    value = fingerprint(bundle, components)
    if state is not None:
        bundle.fingerprints[components] = (state, value)
    return value
