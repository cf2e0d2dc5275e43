from contextlib import ExitStack

import pytest
import torch

from emcid.hooks import add_at_positions, capture, replay_prefix

PROMPTS = ["An image of cat", "A photo of dog", "tench"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_replaying_the_prefix_encodes_exactly_like_the_full_encoder(family, request):
    bundle = request.getfixturevalue(family)
    layers = {slot.name: slot.num_layers - 3 for slot in bundle.slots()}
    positions = torch.tensor([3, 2, 0])
    bumps = {name: torch.randn(len(PROMPTS), bundle.slot(name).hidden_size) for name in layers}

    def encode_edited(replayed: dict[str, torch.Tensor] | None):
        with torch.no_grad(), ExitStack() as stack:
            for name, layer in layers.items():
                blocks = [bundle.slot(name).block(i) for i in range(layer + 1)]
                if replayed is not None:
                    stack.enter_context(replay_prefix(blocks, replayed[name]))
                stack.enter_context(add_at_positions(blocks[-1], positions, bumps[name]))
            return bundle.encode(PROMPTS)

    with torch.no_grad(), capture({n: bundle.slot(n).block(i) for n, i in layers.items()}) as records:
        plain = bundle.encode(PROMPTS)
    full = encode_edited(None)
    replayed = encode_edited({name: outputs[0] for name, outputs in records.items()})
    assert not torch.allclose(full.embeds, plain.embeds)  # the bump changes the encoding
    torch.testing.assert_close(replayed.embeds, full.embeds)
    for mine, reference in zip(replayed.pooled, full.pooled, strict=True):
        torch.testing.assert_close(mine, reference)
    # Leaving the context restores every block's own forward.
    torch.testing.assert_close(bundle.encode(PROMPTS).embeds, plain.embeds)


def test_replay_puts_back_a_forward_set_on_the_instance(sd1):
    block = sd1.slot("text_encoder").block(0)
    calls = []
    original = block.forward

    def wrapped(*args, **kwargs):  # as accelerate's offloading hooks wrap forward
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = wrapped
    with torch.no_grad(), capture({"b": block}) as records:
        sd1.encode(PROMPTS)
    with torch.no_grad(), replay_prefix([block], records["b"][0]):
        sd1.encode(PROMPTS)
    assert block.forward is wrapped and len(calls) == 1
    with torch.no_grad():
        sd1.encode(PROMPTS)
    assert len(calls) == 2
