"""Deprecated path: moved to :mod:`emcid.core.cache`; this module re-exports it for one release."""

from .core.cache import *  # noqa: F401,F403
