"""Deprecated path: moved to :mod:`emcid.core.generation`; this module re-exports it for one release."""

from .core.generation import *  # noqa: F401,F403
