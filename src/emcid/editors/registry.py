"""The registry of editors, in one place: every method by name, and the editor that made a patch."""

from __future__ import annotations

from ..core.bundle import ModelBundle
from ..core.config import RUNTIME_KEYS, Runtime
from ..errors import OptionError
from ..patch.format import EditPatch
from .base import Editor
from .crossattn import TIMEEditor
from .emcid import EMCIDEditor, MEMITEditor
from .emcid.config import STAGE2_BEFORE_OPTIONS
from .emcid.stage1.schedule import BEFORE_OPTIONS
from .esd import ESDEditor
from .presets import DEFAULT_TASK
from .refact import ReFACTEditor
from .uce import UCEEditor

EDITORS: dict[str, type[Editor]] = {
    cls.name: cls for cls in (EMCIDEditor, MEMITEditor, ReFACTEditor, TIMEEditor, UCEEditor, ESDEditor)
}


def editor_class(name: str) -> type[Editor]:
    if name not in EDITORS:
        raise OptionError(f"unknown editing method {name!r}; choose from {', '.join(sorted(EDITORS))}")
    return EDITORS[name]


def get_editor(name: str, bundle: ModelBundle | None = None, **options) -> Editor:
    """An editor by name; ``options`` (and ``task``) over its presets, checked at once."""
    return editor_class(name).create(bundle, **options)


def editor_from_patch(patch: EditPatch | dict, runtime: Runtime | None = None) -> Editor:
    """The editor that made ``patch`` (or its metadata), rebuilt from the recorded hyperparameters.

    Its :meth:`~Editor.edit` on the same model and requests reproduces the patch.
    """
    metadata = patch.metadata if isinstance(patch, EditPatch) else patch
    if "method" not in metadata or "hparams" not in metadata:
        raise OptionError("the patch records no method and hyperparameters to rebuild its editor from")
    hparams, task = _current_form(dict(metadata["hparams"]), metadata.get("task", DEFAULT_TASK))
    return editor_class(metadata["method"]).from_hparams(hparams, runtime, task)


def _current_form(hparams: dict, task: str) -> tuple[dict, str]:
    """Patches written before the presets table kept runtime switches and the task in ``hparams``;
    patches written before a Stage I option (``init``, ``stop_tolerance``, ...) or a Stage II one
    (``destinations``) had its value from before it (``BEFORE_OPTIONS``, ``STAGE2_BEFORE_OPTIONS``)."""
    for key in RUNTIME_KEYS:
        hparams.pop(key, None)
    if isinstance(hparams.get("stage1"), dict):
        hparams["stage1"] = {k: v for k, v in hparams["stage1"].items() if k not in RUNTIME_KEYS}
        for name, before in BEFORE_OPTIONS.items():
            hparams["stage1"].setdefault(name, before)
    if isinstance(hparams.get("stage2"), dict):
        for name, before in STAGE2_BEFORE_OPTIONS.items():
            hparams["stage2"].setdefault(name, before)
    return hparams, hparams.pop("task", task)

