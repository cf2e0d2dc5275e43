"""ICEB results I/O: ``results.json`` written as a run goes, merged with earlier methods' entries.

The file is rewritten (atomically) after every scale with ``"complete": false``, so a long
sweep that stops keeps what it measured. Entries of other methods from an earlier run of
the same model, world, judge and seed are kept beside this run's, so one file compares
methods.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
from pathlib import Path

import torch


def versions() -> dict:
    """Versions of everything a result depends on, for results.json."""
    import diffusers
    import transformers

    from ..tasks.edit import package_version

    return {"emcid": package_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def read_previous(path: Path) -> dict:
    """An earlier results.json, or {} when there is none or it cannot be read."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def merge_previous(results: dict, previous: dict) -> dict:
    """A copy of ``results`` with other methods' entries from an earlier run of the same model,
    world, judge and seed."""
    merged = copy.deepcopy(results)
    same = all(previous.get(k) == results.get(k) for k in ("model_fingerprint", "world", "judge")) and \
        previous.get("settings", {}).get("seed") == results["settings"]["seed"]
    if not same:
        return merged
    for subtask, data in merged["subtasks"].items():
        old = previous.get("subtasks", {}).get(subtask, {}).get("scales", {})
        for scale, methods in old.items():
            for method, entry in methods.items():
                if method != results["method"]:
                    data.setdefault("scales", {}).setdefault(scale, {})[method] = entry
    return merged


class ResultsWriter:
    """The results of one run, written to ``folder/results.json`` as they come in."""

    def __init__(self, folder: Path, header: dict):
        self.path = Path(folder) / "results.json"
        self.previous = read_previous(self.path)  # read once, before this run writes
        self.results = {**header, "subtasks": {}}

    def scales(self, subtask: str, scales: dict) -> None:
        """Record a subtask's scales so far and write the (incomplete) file."""
        self.results["subtasks"].setdefault(subtask, {})["scales"] = copy.deepcopy(scales)
        self.write(complete=False)

    def subtask(self, name: str, data: dict) -> None:
        self.results["subtasks"][name] = data

    def merged(self) -> dict:
        """This run's results with the earlier methods' entries (what the report shows)."""
        return merge_previous(self.results, self.previous)

    def write(self, complete: bool, merged: dict | None = None) -> dict:
        """Write results.json atomically; returns what was written."""
        data = {**(merged if merged is not None else self.merged()), "complete": complete}
        write_atomic(self.path, data)
        return data


def write_atomic(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, swapped in whole (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
