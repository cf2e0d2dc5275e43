"""The edit task: requests checked, deltas computed by an editor, wrapped in a patch whose
metadata (:func:`patch_metadata`, the one place it is written) records what made it."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from ..core.bundle import ModelBundle
from ..core.chain import chain_record
from ..core.tokens import check_window, subject_positions
from ..errors import quote
from ..patch.format import EditPatch
from ..requests.edit import EditRequest, validate_requests
from .erase import generic_destination, resolve_erase


def package_version() -> str:
    try:
        return version("emcid")
    except PackageNotFoundError:
        return "unknown"


def patch_metadata(bundle: ModelBundle, method: str, task: str, base: str, requests: Sequence,
                   hparams: dict, **extra) -> dict:
    """A patch's metadata, in the order the checksum covers: the method and task, the base
    model (``base``: its fingerprint before the edit), the requests, the hyperparameters, the
    package version, the chain of patches the model carried (a sequential edit names them),
    then ``extra`` entries (e.g. debias's report)."""
    return {
        "method": method,
        "task": task,
        "base_fingerprint": base,
        "base_model": bundle.source,
        "family": bundle.family,
        "requests": [r.to_dict() for r in requests],
        "hparams": hparams,
        **extra,
        "emcid_version": package_version(),
        **chain_record(bundle),
    }


def check_prompts(bundle: ModelBundle, requests: Sequence[EditRequest],
                  named: Sequence[EditRequest] | None = None) -> None:
    """Before any work, with each encoder's tokenizer: every source and destination prompt fits
    the token window, and the subject lies inside it. ``named``: the requests as the user
    wrote them, for the messages (an erase's destination is resolved in ``requests``)."""
    for slot in bundle.slots():
        for request, shown in zip(requests, named or requests, strict=True):
            what = f"the request {quote(shown.source)} -> {quote(shown.destination)} ({slot.name})"
            check_window(slot.tokenizer, request.source_prompts(), f"{what}, source")
            check_window(slot.tokenizer, request.destination_prompts(), f"{what}, destination")
            subject_positions(slot.tokenizer, request.prompts, request.source)


def edit_patch(editor, bundle: ModelBundle, requests: Sequence[EditRequest],
               progress: bool = True) -> EditPatch:
    """Check ``editor``'s options and the requests, compute the deltas, and wrap them in a patch."""
    editor.check(bundle)
    checked = validate_requests(editor.prepare(list(requests), bundle))
    resolved = resolve_erase(bundle, checked)
    check_prompts(bundle, resolved, named=checked)
    base = bundle.fingerprint()
    deltas = editor.compute(bundle, resolved, progress)
    metadata = patch_metadata(bundle, editor.name, editor.task, base, checked, editor.hparams(),
                              **editor.report())
    if any(r.is_erase for r in checked):
        metadata["erase_destination"] = generic_destination(bundle)
    return EditPatch.from_dense(deltas, metadata)
