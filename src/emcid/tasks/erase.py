"""Erase, written as edit requests.

A request with an empty destination (``EditRequest("tench", "")``, ``destination: ""`` in a
request file) edits the source into a generic concept. On Stable Diffusion that is the empty
concept: the teacher is the unedited model on the prompt template with nothing in the slot
("An image of "), and the text alignment pulls the pooled output towards that prompt's. On
the embedded model it is its world's neutral concept (a plain canvas), so that erased sources
draw something its judge can recognise. To erase to a word of your choice ("art", "a man"),
give it as the destination: that is an ordinary edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..core.bundle import ModelBundle
from ..requests.edit import ERASE, EditRequest, validate_requests


def is_erase(request: EditRequest) -> bool:
    return request.is_erase


def generic_destination(bundle: ModelBundle) -> str:
    """What an erased concept becomes on this model: the world's neutral concept on the
    embedded model (when its world has one), else the empty concept."""
    if bundle.is_embedded:
        from ..mini import world

        return getattr(world, "NEUTRAL_NAME", ERASE)
    return ERASE


def resolve_erase(bundle: ModelBundle, requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The requests with every erase's destination set to the model's generic one (checked
    again: a generic word may itself be an edited source)."""
    generic = generic_destination(bundle)
    if generic == ERASE or not any(r.is_erase for r in requests):
        return list(requests)
    return validate_requests([replace(r, destination=generic) if r.is_erase else r for r in requests])
