"""Deprecated path: the LoRA export moved to :mod:`emcid.patch.export`; this module re-exports it
for one release."""

from .errors import LoraExportError  # noqa: F401
from .patch.export import (  # noqa: F401
    DEFAULT_WEIGHT_NAME,
    DOWN,
    FAMILY_SLOTS,
    LORA_SUFFIXES,
    UP,
    LoraExport,
    export_lora,
    lora_from_patch,
)
from .patch.format import RANK_RTOL  # noqa: F401
