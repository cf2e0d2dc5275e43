"""Deprecated path: moved to :mod:`emcid.core.activations`; this module re-exports it for one release."""

from .core.activations import *  # noqa: F401,F403
