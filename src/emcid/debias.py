"""Deprecated path: debias requests moved to :mod:`emcid.requests` and the task to
:mod:`emcid.tasks.debias`; this module re-exports both for one release."""

from .core.weights import deltas_applied  # noqa: F401
from .requests.debias import ARTICLES, DebiasRequest, validate_debias_requests  # noqa: F401
from .requests.files import load_debias_requests  # noqa: F401
from .tasks.debias import *  # noqa: F401,F403
from .tasks.debias import DEFAULT_CLIP  # noqa: F401
