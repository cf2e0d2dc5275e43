"""The token probe's conditioning surgery (the probe itself runs in tests/mini)."""

from __future__ import annotations

import torch

from emcid.bench.token_probe import clean_padded, conditioning_override, swapped
from emcid.models import PromptEncoding


def _states(fill: float, length: int = 6) -> torch.Tensor:
    return torch.full((length, 2), fill) + torch.arange(length)[:, None]


def test_subject_swap_replaces_one_position_only():
    out = swapped(_states(0.0), _states(100.0), i=2, j=3, part="subject")
    assert torch.equal(out[2], _states(100.0)[3])
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(out[keep], _states(0.0)[keep])


def test_after_swap_aligns_what_follows_the_subjects():
    out = swapped(_states(0.0), _states(100.0), i=1, j=3, part="after")
    assert torch.equal(out[:2], _states(0.0)[:2])
    assert torch.equal(out[2:4], _states(100.0)[4:6])  # only as many as the destination has
    assert torch.equal(out[4:], _states(0.0)[4:])


def test_clean_padding_keeps_the_prompt_and_its_end_of_text():
    out = clean_padded(_states(0.0), _states(-50.0), end_of_text=3)
    assert torch.equal(out[:4], _states(0.0)[:4])
    assert torch.equal(out[4:], _states(-50.0)[4:])


class _Bundle:
    def encode(self, prompts):
        return PromptEncoding(torch.zeros(len(prompts), 3, 2), None, None)


def test_override_applies_to_its_prompt_and_is_undone():
    bundle = _Bundle()
    with conditioning_override(bundle, "b", torch.ones(3, 2)):
        embeds = bundle.encode(["a", "b", "b"]).embeds
    assert float(embeds[0].abs().sum()) == 0 and bool((embeds[1:] == 1).all())
    assert float(bundle.encode(["b"]).embeds.abs().sum()) == 0
