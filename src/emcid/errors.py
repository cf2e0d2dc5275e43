"""Exceptions with messages meant for the person at the keyboard, and how they quote input."""

import reprlib

QUOTE_LIMIT = 80  # characters of a user's value quoted in an error message

_SHORT_REPR = reprlib.Repr()  # bounded: never walks a whole YAML alias bomb
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, QUOTE_LIMIT, QUOTE_LIMIT
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 8


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``value`` as an error message quotes it, cut at ``limit`` characters with "...": a
    pasted essay or a YAML alias bomb must still make one short line."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class EmcidError(Exception):
    """Base class: every error emcid raises on bad input derives from it."""


class RequestError(EmcidError, ValueError):
    """An edit request (or a list of them) is malformed or contradictory."""


class ModelLoadError(EmcidError):
    """A model folder or hub id cannot be loaded as a supported pipeline."""


class StatsMismatchError(EmcidError):
    """Cached or given preservation statistics do not belong to this model."""


class Stage1DivergedError(EmcidError, FloatingPointError):
    """Stage I produced NaN or inf: the optimisation diverged."""


class PatchMismatchError(EmcidError):
    """A patch does not belong to the model it is applied to."""


class PatchFileError(EmcidError):
    """A file given as a patch is missing, corrupted, or not an emcid patch."""


class CacheError(EmcidError):
    """The cache folder cannot be used (a file, or not writable)."""


class OptionError(EmcidError, ValueError):
    """An editor, generation or benchmark option is unknown or out of range (checked before any work)."""


class BenchmarkError(EmcidError, ValueError):
    """A benchmark cannot run as configured (bad settings, missing model or judge)."""


class DeviceError(EmcidError):
    """The requested device (e.g. ``cuda:1``) is not available on this machine."""


class OutputPathError(EmcidError):
    """An output path would overwrite an input, or cannot be written (checked before any work)."""


class WriteError(EmcidError, OSError):
    """A file could not be written (a full disk, a folder that became read-only); nothing
    half-written is left behind."""


class Stage1OutOfMemoryError(EmcidError, MemoryError):
    """Even one concept at a time does not fit in the device's memory."""


class LoraExportError(EmcidError):
    """A patch cannot be exported as a LoRA with the options given."""
