"""Editors behind one contract (:class:`Editor`): requests in, an EditPatch out.

The registry is :mod:`.registry`; ``base`` defines the contract and imports no editor.
"""

from __future__ import annotations

from .base import ConfiguredEditor, Editor
from .registry import EDITORS, editor_class, editor_from_patch, get_editor

__all__ = ["EDITORS", "ConfiguredEditor", "Editor", "editor_class", "editor_from_patch", "get_editor"]
