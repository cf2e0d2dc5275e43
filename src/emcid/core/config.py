"""Options as data: range checks, dataclass round trips, config files, runtime switches.

Hyperparameters (what a result depends on) live in each editor's config dataclass and are
recorded in the patch; runtime switches (:class:`Runtime`) only change where results are
kept or how fast they come, so they are never recorded and never part of a cache key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import OptionError, quote
from .corpus import read_corpus
from .textfiles import load_data, read_utf8


def check_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    """``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{owner} option {name}={quote(value)}: give an integer >= {minimum}")


def check_float(owner: str, name: str, value: object, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite number inside the interval (open ends where asked)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise OptionError(f"{owner} option {name}={quote(value)}: give a finite number in {span}")


def check_bool(owner: str, name: str, value: object) -> None:
    """``value`` is a bool (not 0 or 1, not a string)."""
    if not isinstance(value, bool):
        raise OptionError(f"{owner} option {name}={quote(value)}: give true or false")


def check_choice(owner: str, name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise OptionError(f"{owner} option {name}={quote(value)}: choose from {', '.join(map(str, choices))}")


def check_corpus(corpus: str | None) -> None:
    """A caption file given for the statistics gives captions: checked before the model loads
    (the command line) and before Stage I's work (the editors), not at the statistics."""
    if corpus is not None:
        read_corpus(corpus)


def build(cls: type, data: dict, owner: str) -> Any:
    """A config dataclass from a dictionary; unknown keys are an :class:`OptionError`."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise OptionError(f"unknown {owner} options: {quote(unknown)}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a value of the wrong shape (e.g. a list for a number)
        raise OptionError(f"{owner} options: {quote(str(exc))}") from exc


@dataclass
class Runtime:
    """Switches that change speed or storage, not which edit is made (not recorded in patches).

    Stage I reads ``concept_batch`` (``cpu_concept_batch``), ``precision``,
    ``grad_checkpointing``, ``cuda_graphs`` and ``checkpoint_every``; a precision other than
    fp32 may move results slightly, so it is part of Stage I's cache key.
    """

    cache: bool = True  # reuse and store Stage I targets, images and statistics on disk
    cache_root: str | None = None  # None: $EMCID_CACHE, else the user cache folder
    # Stage I concepts optimised side by side in one tensor program, at most. None: on CUDA as
    # many as fit the free memory (a small model is launch-bound there, so more is faster),
    # elsewhere cpu_concept_batch.
    concept_batch: int | None = None
    cpu_concept_batch: int = 8
    precision: str = "auto"  # Stage I UNet autocast: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16
    grad_checkpointing: bool = False  # Stage I: recompute UNet activations in backward (less memory)
    # Stage I on CUDA: after a few eager steps, replay each step as one captured CUDA graph (a
    # small model's step is bound by kernel launches there); false: every step eager.
    cuda_graphs: bool = True
    checkpoint_every: int = 25  # Stage I steps between saved progress of unfinished concepts

    def __post_init__(self) -> None:
        for name in ("cache", "grad_checkpointing", "cuda_graphs"):
            check_bool("runtime", name, getattr(self, name))
        if self.concept_batch is not None:
            check_int("runtime", "concept_batch", self.concept_batch)
        check_int("runtime", "cpu_concept_batch", self.cpu_concept_batch)
        check_int("runtime", "checkpoint_every", self.checkpoint_every)
        check_choice("runtime", "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))

    def to_dict(self) -> dict:
        return asdict(self)


RUNTIME_KEYS = frozenset(f.name for f in fields(Runtime))


def split_runtime(options: dict) -> tuple[dict, dict]:
    """(hyperparameter options, runtime options) of one flat option dictionary."""
    runtime = {k: v for k, v in options.items() if k in RUNTIME_KEYS}
    return {k: v for k, v in options.items() if k not in RUNTIME_KEYS}, runtime


def read_config_file(path: str | Path) -> dict:
    """Options from a YAML or JSON file (a mapping; nested ``stage1``/``stage2`` allowed)."""
    path = Path(path)
    try:
        text = read_utf8(path, OptionError)
    except OSError as exc:
        raise OptionError(f"cannot read the config file {path}: {exc}") from exc
    data = load_data(path, text, OptionError)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise OptionError(f"{path}: expected a mapping of option names to values, "
                          f"not a {type(data).__name__}")
    return data


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` from a command line: a JSON value where it parses (numbers, lists), else text."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
