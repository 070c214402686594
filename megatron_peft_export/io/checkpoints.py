"""Megatron's checkpoint layout, in one place: iteration directories and the tracker file.

A save directory holds one `iter_0000100` directory per saved iteration (seven digits, more past 9999999), a
`release` directory for checkpoints saved with `release=True`, and the tracker file `latest_checkpointed_iteration.txt`
naming the newest complete save (an iteration number, or `release`). Megatron-LM, Megatron-Bridge and
megatron-core's own saves share this layout. The tracker is read through safe_read: a small regular file of the save
directory (a FIFO there never blocks, a link leaving the directory is refused).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ExportError
from .safe_read import TRACKER_LIMIT, read_text

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
ITERATION_GLOB = "iter_*"
"""A glob matching every iteration directory of a save directory (and names that only look like one)."""
ITERATION_PLACEHOLDER = "iter_XXXXXXX"
"""How messages and help texts name an iteration directory."""
_ITERATION_NAME = re.compile(r"iter_(\d+)")
MAX_ITERATION_DIGITS = 18
"""A tracker's number longer than this names no directory (a file name has at most 255 bytes)."""


def iteration_name(iteration: int) -> str:
    """The directory name of one iteration's checkpoint: `iter_0000100`."""
    return f"iter_{iteration:07d}"


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    """Megatron's checkpoint directory for one iteration."""
    return Path(save_dir) / iteration_name(iteration)


def release_dir(save_dir: str | Path) -> Path:
    """The checkpoint directory of a `release=True` save (conversion tools, not training)."""
    return Path(save_dir) / RELEASE


def parse_iteration(name: str) -> int | None:
    """The iteration an iteration directory's name holds (`iter_0000100` -> 100), None for any other name."""
    match = _ITERATION_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def iteration_of(path: str | Path) -> int | None:
    """The iteration of `<save>/iter_0000100/<subdir>` (or of `iter_0000100` itself); None outside that layout."""
    path = Path(path)
    for part in (path.name, path.parent.name):
        if (found := parse_iteration(part)) is not None:
            return found
    return None


def iteration_dirs(save_dir: str | Path) -> list[Path]:
    """The iteration directories of a save directory, oldest first."""
    found = [p for p in Path(save_dir).glob(ITERATION_GLOB) if p.is_dir() and parse_iteration(p.name) is not None]
    return sorted(found, key=lambda p: (parse_iteration(p.name), p.name))


def read_tracker(save_dir: str | Path, *, error: type[ExportError] = ExportError) -> int | None:
    """The iteration the tracker file of `save_dir` names; None when there is no tracker file. A tracker that is not a
    small regular file of the save directory holding a number (`release` included) raises `error`."""
    tracker = Path(save_dir) / TRACKER
    try:
        tracker.lstat()
    except FileNotFoundError:
        return None
    except OSError:
        pass  # read_text names what is wrong with it
    text = read_text(
        tracker, limit=TRACKER_LIMIT, within=save_dir, error=error, what="Megatron's tracker file (an iteration number)"
    ).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_ITERATION_DIGITS:
        long = f" ({len(text)} characters; at most {MAX_ITERATION_DIGITS} digits)" if len(text) > 18 else ""
        raise error(
            f"{tracker}: expected an iteration number, found {text[:40]!r}{long}; pass the {ITERATION_PLACEHOLDER} "
            "directory to read instead"
        )
    return int(text)


def tracker_iteration(save_dir: str | Path) -> int | None:
    """The iteration Megatron's tracker file names, or None while there is none (or it is not a small regular file
    of the save directory holding a number: a FIFO there never blocks this)."""
    try:
        return read_tracker(save_dir)
    except ExportError:
        return None
