"""``earlier_edits="replay"``: a sequential batch solved as one batch of the whole chain.

A model that carries EMCID patches records every request they made. A replayed batch takes
those requests with its own, computes Stage I targets and the Stage II update for all of them
on the base model (the earlier concepts' targets come from the Stage I cache), and returns the
difference between that update and what the chain already added. Applied on top of the chain,
the model then holds exactly the one-batch edit of every concept so far: a later batch costs
the earlier ones nothing (docs/method.md, "Sequential batches").
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ...core.bundle import ModelBundle
from ...core.chain import chain_modules, chain_steps
from ...core.tokens import normalise
from ...errors import RequestError
from ...requests.edit import EditRequest, validate_requests


def replay_problem(bundle: ModelBundle, method: str, task: str, edited: set[str]) -> str | None:
    """Why the chain the model carries cannot be replayed by ``method`` for ``task`` editing the
    modules ``edited`` (None if it can): every patch must be this method's, for this task,
    applied at full strength, with its requests recorded, on modules this batch edits."""
    for number, step in enumerate(chain_steps(bundle), 1):
        # a folder's chain written before tasks were recorded names none (its requests still
        # have to make one valid batch with the new ones)
        if step["method"] != method or step["task"] not in (task, None):
            return (f"patch {number} of the chain was made by {step['method']} for the "
                    f"{step['task']} task, not by {method} for {task}")
        if step["requests"] is None:
            return f"patch {number} of the chain records no requests"
        if step["erase_destination"] is None and any(not r["destination"] for r in step["requests"]):
            return f"patch {number} of the chain erases, but records no erase destination"
        if step["scale"] != 1.0:
            return f"patch {number} of the chain was applied at scale {step['scale']}, not 1"
    outside = sorted(chain_modules(bundle) - edited)
    if outside:
        return f"the chain changed {len(outside)} module(s) this batch does not edit ({outside[0]}, ...)"
    return None


def earlier_requests(bundle: ModelBundle, requests: list[EditRequest]) -> list[EditRequest]:
    """The requests of the chain's patches, oldest first, less the sources edited again later
    (by a later patch, or by ``requests``): a source keeps the request of the last patch that
    edited it. Erases take the destination their patch recorded for them, as when they were
    made. Refused where they and ``requests`` are not a valid batch together (a chain A -> B,
    B -> C across batches): replay solves them as one."""
    seen = {normalise(r.source) for r in requests}
    kept: list[list[tuple[EditRequest, str]]] = []
    steps = chain_steps(bundle)
    for number, step in reversed(list(enumerate(steps, 1))):
        found = [EditRequest.from_dict(data) for data in step["requests"]]
        kept.append([(replace(r, destination=step["erase_destination"]) if r.is_erase else r,
                      f"request {index} of patch {number} of the chain")
                     for index, r in enumerate(found, 1) if normalise(r.source) not in seen])
        seen |= {normalise(r.source) for r in found}
    earlier = [pair for step in reversed(kept) for pair in step]
    labels = [label for _, label in earlier] + [f"request {i} of this batch"
                                                for i in range(1, len(requests) + 1)]
    try:
        validate_requests([r for r, _ in earlier] + list(requests), labels)
    except RequestError as exc:
        raise RequestError(f"earlier_edits='replay' solves the chain's requests and this batch's as one "
                           f"batch: {exc} (earlier_edits='hold' edits the patched model instead)") from None
    return [r for r, _ in earlier]


def chain_difference(solved: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                     current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module, the delta that takes its weight from ``current`` (the chain's) to ``base``
    plus ``solved`` (the one-batch update of every concept)."""
    return {name: delta - (current[name].float().cpu() - base[name].float().cpu())
            for name, delta in solved.items()}
