"""Reading hidden states at subject tokens, shared by the editing tests."""

from __future__ import annotations

import torch

from emcid.hooks import capture_at_positions
from emcid.requests import subject_positions


def block_output_at_subject(bundle, slot_name: str, layer: int, templates, subject) -> torch.Tensor:
    """Output of block ``layer`` at the subject token of each formatted template."""
    slot = bundle.slot(slot_name)
    positions = subject_positions(slot.tokenizer, list(templates), subject)
    with torch.no_grad(), capture_at_positions({"b": slot.block(layer)}, positions) as records:
        bundle.encode([t.format(subject) for t in templates])
    return records["b"][0]
