"""The Editor contract: requests in, weight deltas out (the edit task, :mod:`emcid.tasks.edit`,
wraps them in an EditPatch). EMCID and every baseline implement it.

An editor is built from options (:meth:`Editor.create`: presets, then the model folder's
overrides, then the caller's options, all checked before any work) or from the
hyperparameters recorded in a patch (:meth:`Editor.from_hparams`). This module imports no
concrete editor; ``emcid.editors`` holds the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

from ..core.bundle import ModelBundle
from ..core.cache import TensorCache
from ..core.config import Runtime, build, split_runtime
from ..errors import OptionError
from ..requests.edit import EditRequest
from .presets import DEFAULT_TASK, preset_options


class Editor(ABC):
    """Edits a model's concepts. Subclasses set ``name`` and implement the abstract methods.

    ``lineage`` names the methods whose presets apply (a variant lists its parent first);
    ``runtime_options`` the :class:`~emcid.config.Runtime` switches the editor uses, so a
    switch it has no use for (``cache=False`` on an editor without caches) is refused.
    """

    name: ClassVar[str] = ""
    lineage: ClassVar[tuple[str, ...]] = ()
    runtime_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, runtime: Runtime | None = None, task: str = DEFAULT_TASK):
        self.runtime = runtime or Runtime()
        self.task = task  # recorded in the patch; its presets are already in the options

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        return cls.lineage or (cls.name,)

    @classmethod
    @abstractmethod
    def from_hparams(cls, hparams: dict, runtime: Runtime | None = None,
                     task: str = DEFAULT_TASK) -> Editor:
        """The editor whose :meth:`hparams` are ``hparams`` (no presets applied)."""

    @classmethod
    def create(cls, bundle: ModelBundle | None = None, task: str = DEFAULT_TASK,
               **options) -> Editor:
        """Options over the presets of this method, ``bundle``'s family and ``task``.

        Raises :class:`~emcid.errors.OptionError` for an unknown or out-of-range option;
        with a ``bundle``, options that depend on the model (layers) are checked too.
        """
        presets = cls.presets(bundle, task, options)
        hparams, runtime = split_runtime({**cls.flat_options(presets), **cls.flat_options(options)})
        unused = sorted(k for k in runtime if k not in cls.runtime_options)
        if unused:
            what = "keeps no cache" if {"cache", "cache_root"} & set(unused) else "has no such switch"
            raise OptionError(f"{cls.name} {what}: {', '.join(unused)} does not apply to it")
        editor = cls.from_hparams(hparams, Runtime(**runtime), task)
        if bundle is not None:
            editor.check(bundle)
        return editor

    @classmethod
    def presets(cls, bundle: ModelBundle | None, task: str, options: dict) -> dict:
        """The preset options that ``options`` go over (:mod:`emcid.editors.presets`)."""
        return preset_options(cls.methods(), bundle, task)

    @classmethod
    def flat_options(cls, options: dict) -> dict:
        """``options`` with any nesting undone, so that presets and callers merge key by key."""
        return dict(options)

    @abstractmethod
    def hparams(self) -> dict:
        """JSON-serialisable hyperparameters, recorded in the patch."""

    def check(self, bundle: ModelBundle) -> None:  # noqa: B027 (optional hook)
        """Refuse options this model cannot take (before any work); the default has none."""

    def prepare(self, requests: list[EditRequest], bundle: ModelBundle) -> list[EditRequest]:
        """The requests as this editor edits them on ``bundle`` (e.g. a task's default prompts)."""
        return requests

    @abstractmethod
    def compute(self, bundle: ModelBundle, requests: list[EditRequest],
                progress: bool) -> dict:
        """Return the dense weight delta of every edited module, by module name."""

    def report(self) -> dict:
        """What the last :meth:`compute` measured that a patch should record (none by default)."""
        return {}

    def cache(self, namespace: str) -> TensorCache:
        """The on-disk cache ``namespace`` as the runtime switches say."""
        root = self.runtime.cache_root
        return TensorCache(namespace, root=Path(root) if root else None, enabled=self.runtime.cache)


class ConfiguredEditor(Editor):
    """An editor whose hyperparameters are exactly one config dataclass (``config_class``)."""

    config_class: ClassVar[type]

    def __init__(self, config=None, runtime: Runtime | None = None, task: str = DEFAULT_TASK):
        super().__init__(runtime, task)
        self.config = config if config is not None else self.config_class()

    @classmethod
    def from_hparams(cls, hparams: dict, runtime: Runtime | None = None,
                     task: str = DEFAULT_TASK) -> ConfiguredEditor:
        from_dict = getattr(cls.config_class, "from_dict", None)
        config = from_dict(hparams) if from_dict else build(cls.config_class, hparams, cls.name)
        return cls(config, runtime, task)

    def hparams(self) -> dict:
        return asdict(self.config)
