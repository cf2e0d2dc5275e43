"""Where Stage I starts: the unedited block-l* states, and the text estimate h_dst - h_src.

The release starts every ``delta`` at zero. emcid starts it from the text estimate: for each
prompt, the unedited block-l* state at the destination's last token in the destination
prompt minus the source's at the subject token, averaged over the prompts. Swapping that
state alone draws the destination, and from there the loss has a minimum that still does,
where from zero a far edit settles on one that draws a third concept (docs/method.md,
"Stage I's start").
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch

from ....core.bundle import ModelBundle
from ....core.hooks import capture, stop_after
from ....core.tokens import length_groups, subject_positions
from ....requests.edit import EditRequest


def record_block_outputs(bundle: ModelBundle, z_layer: dict[str, int],
                         encode: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Unedited outputs of every edited encoder's block l* at every token of what ``encode``
    encodes (what Stage I replays, and where it reads the states at the subject)."""
    with torch.no_grad(), ExitStack() as stack:
        records = {name: stack.enter_context(capture({name: bundle.slot(name).block(layer)}))
                   for name, layer in z_layer.items()}
        encode()
    return {name: records[name][name][0].float() for name in z_layer}


@torch.no_grad()
def states_at(bundle: ModelBundle, slot_name: str, layer: int, prompts: list[str],
              positions: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Block ``layer``'s unedited output at one token of each prompt, (prompts, width).

    CLIP's text encoders are causal, so each prompt is encoded only up to that token, without
    padding, prompts of equal length together, and no block after ``layer`` runs: the same
    states as the pipeline's 77-token pass, at a fraction of its cost.
    """
    slot = bundle.slot(slot_name)
    tokenizer = slot.tokenizer
    ids = tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length).input_ids
    states: torch.Tensor | None = None
    for rows in length_groups(positions, batch_size):
        length = int(positions[rows[0]]) + 1
        batch = torch.tensor([ids[i][:length] for i in rows], device=bundle.device)
        last = torch.full((len(rows),), length - 1)
        with capture({"b": slot.block(layer)}, last) as records, stop_after(slot.block(layer)):
            slot.encoder(batch)
        found = records["b"][0].float()
        if states is None:
            states = found.new_empty(len(prompts), found.shape[-1])
        states[rows] = found
    return states


def text_estimate(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
                  hidden: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per text encoder, (concepts, width): the mean over each concept's prompts of h_dst - h_src
    at l* (``hidden``: its h_src per prompt). An empty destination (an erase on Stable
    Diffusion) has no token to read, so it starts from zero."""
    worded = [r for r in requests if r.destination.strip()]
    prompts = [p for r in worded for p in r.destination_prompts()]
    estimate = {}
    for name, layer in z_layer.items():
        tokenizer = bundle.slot(name).tokenizer
        positions = [subject_positions(tokenizer, r.prompts, r.destination) for r in worded]
        states = states_at(bundle, name, layer, prompts, torch.cat(positions)) if worded else None
        rows, start = [], 0
        for request, h in zip(requests, hidden[name], strict=True):
            if not request.destination.strip():
                rows.append(torch.zeros_like(h[0]))
                continue
            count = len(request.prompts)
            rows.append((states[start:start + count].to(h) - h).mean(0))
            start += count
        estimate[name] = torch.stack(rows)
    return estimate


def initial_deltas(bundle: ModelBundle, requests: list[EditRequest], z_layer: dict[str, int],
                   hidden: dict[str, list[torch.Tensor]], init: str,
                   limits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each concept's delta at step 0 (a leaf tensor to optimise): zeros (``init="zero"``, the
    release) or the text estimate, inside the norm clamp ``limits`` that every step keeps."""
    device = next(iter(limits.values())).device
    if init == "zero":
        return {name: torch.zeros(len(requests), rows[0].shape[-1], device=device, requires_grad=True)
                for name, rows in hidden.items()}
    deltas = {}
    for name, start in text_estimate(bundle, requests, z_layer, hidden).items():
        start, limit = start.to(device), limits[name]
        norms = start.norm(dim=1)
        start = start * torch.where(norms > limit, limit / norms, torch.ones_like(norms)).unsqueeze(1)
        deltas[name] = start.requires_grad_(True)
    return deltas
