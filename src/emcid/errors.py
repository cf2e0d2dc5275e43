"""Exceptions with messages meant for the person at the keyboard."""


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
