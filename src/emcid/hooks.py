"""Deprecated path: moved to :mod:`emcid.core.hooks`; this module re-exports it for one release."""

from .core.hooks import *  # noqa: F401,F403
