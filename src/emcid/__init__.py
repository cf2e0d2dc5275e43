"""emcid: edit many concepts at once in text-to-image diffusion models.

Typical use::

    import emcid
    bundle = emcid.load_model()                      # the embedded model, or a diffusers folder / hub id
    requests = [emcid.EditRequest("tench", "goldfish")]
    patch = emcid.edit(bundle, requests)             # Stage I + Stage II
    patch.save("tench.safetensors"); patch.apply(bundle)
"""

from __future__ import annotations

from collections.abc import Sequence

from .core.bundle import ModelBundle
from .core.loading import load_model
from .errors import EmcidError
from .patch.format import EditPatch
from .requests import DebiasRequest, EditRequest, load_requests, parse_requests

__all__ = ["EditPatch", "EditRequest", "EmcidError", "ModelBundle", "edit", "load_model",
           "load_requests"]


def edit(bundle: ModelBundle, requests: Sequence, method: str = "emcid",
         progress: bool = True, **options) -> EditPatch:
    """Edit ``requests`` into ``bundle`` with ``method``; returns the patch (not yet applied).

    ``requests`` are :class:`EditRequest` objects or mappings as in a request file; debias
    requests (``{"source": "doctor", "debias": ["male", "female"]}`` or
    :class:`emcid.requests.DebiasRequest`) run the debias task (:func:`emcid.tasks.debias.debias`),
    which also takes ``classifier`` (a callable or a CLIP id) and tuning options such as
    ``images`` and ``rounds``. One call takes one kind of request.

    ``options`` override the method's presets (e.g. ``steps=100, lam=6000,
    layers={"text_encoder": [7, 8, 9, 10]}``); ``task="artist"`` selects the artist presets;
    runtime switches (``cache``, ``cache_root``, ``concept_batch``) go here too. Every option
    is checked before any work (:class:`~emcid.errors.OptionError`).
    """
    requests = parse_requests(requests)
    if isinstance(requests[0], DebiasRequest):
        from .tasks.debias import edit_debias

        return edit_debias(bundle, requests, method, progress=progress, **options)
    from .editors.registry import get_editor
    from .tasks.edit import edit_patch

    return edit_patch(get_editor(method, bundle, **options), bundle, requests, progress=progress)
