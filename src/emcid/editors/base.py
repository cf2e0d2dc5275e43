"""The Editor interface: requests in, an EditPatch out. EMCID and every baseline implement it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, fields
from importlib.metadata import PackageNotFoundError, version

from ..models import ModelBundle
from ..patch import EditPatch, chain_record
from ..requests import EditRequest, subject_positions, validate_requests
from ..tasks import generic_destination, is_erase, resolve_erase


def package_version() -> str:
    try:
        return version("emcid")
    except PackageNotFoundError:
        return "unknown"


class Editor(ABC):
    """Edits a model's concepts; subclasses set ``name`` and implement :meth:`compute`."""

    name: str = ""

    @abstractmethod
    def compute(self, bundle: ModelBundle, requests: list[EditRequest],
                progress: bool) -> dict:
        """Return the dense weight delta of every edited module, by module name."""

    @abstractmethod
    def hparams(self) -> dict:
        """JSON-serialisable hyperparameters, recorded in the patch."""

    def edit(self, bundle: ModelBundle, requests: Sequence[EditRequest],
             progress: bool = True) -> EditPatch:
        """Validate the requests, compute the deltas, and wrap them in a patch."""
        checked = validate_requests(list(requests))
        for slot in bundle.slots():  # fail before any work if a subject cannot be located
            for request in checked:
                subject_positions(slot.tokenizer, request.prompts, request.source)
        base = bundle.fingerprint()
        deltas = self.compute(bundle, resolve_erase(bundle, checked), progress)
        metadata = {
            "method": self.name,
            "base_fingerprint": base,
            "base_model": bundle.source,
            "family": bundle.family,
            "requests": [r.to_dict() for r in checked],
            "hparams": self.hparams(),
            "emcid_version": package_version(),
            **chain_record(bundle),  # a sequential edit names the patches it was made on
        }
        if any(is_erase(r) for r in checked):
            metadata["erase_destination"] = generic_destination(bundle)
        return EditPatch.from_dense(deltas, metadata)


class ConfiguredEditor(Editor):
    """An editor whose options are exactly the fields of one config dataclass."""

    config_class: type

    def __init__(self, config=None):
        self.config = config or self.config_class()

    @classmethod
    def create(cls, bundle: ModelBundle | None = None, **options) -> ConfiguredEditor:
        unknown = set(options) - {f.name for f in fields(cls.config_class)}
        if unknown:
            raise ValueError(f"unknown {cls.name} options: {sorted(unknown)}")
        return cls(cls.config_class(**options))

    def hparams(self) -> dict:
        return asdict(self.config)


EDITORS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    EDITORS[cls.name] = cls
    return cls


def get_editor(name: str, bundle: ModelBundle | None = None, **options) -> Editor:
    """An editor by name; ``options`` override its hyperparameters."""
    from . import crossattn, emcid, refact  # noqa: F401  (registers the built-in editors)

    if name not in EDITORS:
        raise ValueError(f"unknown editing method {name!r}; available: {sorted(EDITORS)}")
    return EDITORS[name].create(bundle, **options)
