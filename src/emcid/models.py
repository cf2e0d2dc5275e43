"""Deprecated path: the loaded model now lives in :mod:`emcid.core` (``bundle``, ``family``,
``loading``, ``fingerprint``, ``chain``). This module re-exports it for one release."""

from .core.bundle import ModelBundle, PromptEncoding, TextEncoderSlot, get_submodule  # noqa: F401
from .core.chain import HISTORY_DIR, HISTORY_FILE  # noqa: F401
from .core.family import (  # noqa: F401
    BLOCK_TEMPLATE,
    COMPONENTS,
    EMBEDDED_TASKS,
    FAMILIES,
    FAMILY_SAMPLING,
    FC2_TEMPLATE,
    detect_family,
)
from .core.fingerprint import fingerprint  # noqa: F401
from .core.loading import (  # noqa: F401
    PICKLE_SUFFIXES,
    SETTINGS_FILE,
    check_device,
    default_model_path,
    freeze_components,
    load_model,
    write_settings,
)
