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


def interrupt_at_the_end(bundle, requests, z_layer, config, cache, runtime, monkeypatch) -> None:
    """Run Stage I and kill it after its last step, before the results are saved (its
    progress checkpoints stay in the cache)."""
    import pytest

    from emcid.editors.emcid.stage1 import compute_targets, engine

    original = engine.check_health

    def interrupted_before_the_end(requests, first_bad, overflow, deltas=None):
        if deltas is not None:  # the last step is done; the results are not saved yet
            raise KeyboardInterrupt
        original(requests, first_bad, overflow, deltas)

    monkeypatch.setattr(engine, "check_health", interrupted_before_the_end)
    with pytest.raises(KeyboardInterrupt):
        compute_targets(bundle, requests, z_layer, config, cache, progress=False, runtime=runtime)
    monkeypatch.setattr(engine, "check_health", original)
