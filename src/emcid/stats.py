"""Deprecated path: moved to :mod:`emcid.core.stats`; this module re-exports it for one release."""

from .core.stats import *  # noqa: F401,F403
