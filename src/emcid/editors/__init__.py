"""Editors behind one interface: requests in, an EditPatch out."""

from .base import EDITORS, Editor, get_editor

__all__ = ["EDITORS", "Editor", "get_editor"]
