"""Deprecated path: moved to :mod:`emcid.core.config`; this module re-exports it for one release."""

from .core.config import *  # noqa: F401,F403
