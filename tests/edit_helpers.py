"""Settings and readers shared by the editing tests (a unique module name: test folders of
other parts have their own conftest)."""

from __future__ import annotations

import torch

from emcid.hooks import capture
from emcid.requests import subject_positions


def block_output_at_subject(bundle, slot_name: str, layer: int, templates, subject) -> torch.Tensor:
    """Output of block ``layer`` at the subject token of each formatted template."""
    slot = bundle.slot(slot_name)
    positions = subject_positions(slot.tokenizer, list(templates), subject)
    with torch.no_grad(), capture({"b": slot.block(layer)}, positions) as records:
        bundle.encode([t.format(subject) for t in templates])
    return records["b"][0]


# Small-model settings: the release lam (4000) is calibrated for SD's 3072-wide keys; the tiny
# encoders have 128-wide keys, so a proportionally small preservation weight is used.
FAST = {"steps": 20, "stats_samples": 300, "lam": 1.0}


def model_state(bundle) -> dict[str, torch.Tensor]:
    """A copy of every weight of the text encoder, UNet and VAE (for bit-exact comparisons)."""
    return {f"{c}.{k}": v.clone() for c in ("text_encoder", "unet", "vae")
            for k, v in getattr(bundle, c).state_dict().items()}


def assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
