"""Folders written whole and swapped into place, and the leftovers of runs that were killed.

A pipeline folder is written beside its final place (``.NAME.emcid-tmp-PID``) and swapped in
with two renames: the old folder aside (``.NAME.emcid-old-PID``), the new one into place. A
process killed between the two leaves the folder missing and both halves beside it; the next
run that reads or writes the folder finishes the swap (the new folder is complete by then) or
puts the old one back, and removes what dead processes left. Files written atomically carry
their writer's PID in their name for the same reason.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TMP, OLD = "emcid-tmp", "emcid-old"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a reused id counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _left_by_dead(folder: Path, pattern: str) -> list[tuple[Path, int]]:
    """Entries of ``folder`` whose name matches ``pattern`` (its group: the writer's PID), with
    that PID, where the writer is dead."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(pattern, path.name)
        if match and not pid_alive(int(match.group(1))):
            found.append((path, int(match.group(1))))
    return found


def _leftovers(folder: Path, kind: str) -> list[tuple[Path, int]]:
    """``.NAME.<kind>-PID`` siblings of ``folder`` whose writer is dead."""
    return _left_by_dead(folder.parent, rf"\.{re.escape(folder.name)}\.{kind}-(\d+)")


def recover_swap(folder: str | os.PathLike) -> None:
    """Finish or undo a swap into ``folder`` that a killed process left half done, and remove
    the halves dead processes left beside it."""
    folder = Path(folder)
    olds = dict((pid, path) for path, pid in _leftovers(folder, OLD))
    tmps = dict((pid, path) for path, pid in _leftovers(folder, TMP))
    if not folder.exists():
        # The old folder goes aside only once the new one is complete: finish that swap.
        finished = next((pid for pid in olds if pid in tmps), None)
        if finished is not None:
            tmps.pop(finished).rename(folder)
            log.warning("finished writing %s, which an interrupted run left half swapped", folder)
        elif olds:
            olds.pop(max(olds)).rename(folder)
            log.warning("restored %s, which an interrupted run had moved aside", folder)
    for path in [*olds.values(), *tmps.values()]:
        shutil.rmtree(path, ignore_errors=True)


def replace_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh folder beside ``folder``, then swap it into place (over
    any old one), so an interrupted save leaves no half-written folder."""
    folder = Path(folder)
    recover_swap(folder)
    tmp = folder.parent / f".{folder.name}.{TMP}-{os.getpid()}"
    old = folder.parent / f".{folder.name}.{OLD}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        give_umask_modes(tmp)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def give_umask_modes(folder: Path) -> None:
    """Files and folders under ``folder`` get the modes the user's umask gives (safetensors
    writes its files 0600, which another user or a container could not read)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def temp_file_prefix() -> str:
    """The name prefix of this process's temporary files (see :func:`remove_stale_files`)."""
    return f".{TMP}-{os.getpid()}-"


def remove_stale_files(folder: Path) -> None:
    """Remove the temporary files that dead processes left in ``folder``."""
    for path, _ in _left_by_dead(folder, rf"\.{TMP}-(\d+)-.*\.tmp"):
        try:
            path.unlink()
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted run (%s)", path, exc.strerror)
