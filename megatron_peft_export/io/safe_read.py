"""The one way this package opens a file that came from someone else (checkpoints, adapters, configs, references).

- Regular files only. The path is stat'ed first, so a FIFO, socket, device or directory is refused without being
  opened (opening some devices has effects); the file is then opened with O_NONBLOCK (a FIFO swapped in after
  the stat still cannot block the open) and fstat'ed: it must be the same regular file.
- `within`: the directory being read. A path that resolves (through symlinks) outside it is refused, so a link
  inside a checkpoint or adapter directory cannot make us read `~/.cache/huggingface/token` or `/dev/zero`.
  The one exception is the Hugging Face cache's own layout: files of `<repo>/snapshots/<rev>/` are links
  into `<repo>/blobs/`.
- Sizes come from fstat of the opened file, never from a stat of the path, and are checked against a cap
  before anything is allocated; reads are bounded by that size, so a file that grows while read is cut off.
- Libraries that open files by name (safetensors) get `/proc/self/fd/N` of the file opened here (on Linux),
  so they read the very file that was checked.

Every refusal is an ExportError (the caller chooses the subclass) naming the path and what was expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.brief import check_tree
from ..errors import ExportError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TRACKER_LIMIT = 1 * KiB
"""Megatron's latest_checkpointed_iteration.txt: a number or `release`."""
JSON_LIMIT = 16 * MiB
"""config.json, verification.json and other JSON documents (adapter_config.json has its own 1 MiB)."""
YAML_LIMIT = 16 * MiB
"""Megatron-Bridge's run_config.yaml."""
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _allowed_roots(within: Path) -> list[str]:
    root = os.path.realpath(within)
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":  # huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


class RegularFile:
    """An open regular file: its descriptor, its size at open time (fstat), and bounded positional reads."""

    def __init__(self, path: Path, fd: int, size: int, error: type[ExportError]) -> None:
        self.path, self.fd, self.size, self._error = path, fd, size, error

    def check_range(self, offset: int, length: int, what: str) -> None:
        """Refuse a byte range that does not lie inside the file (checked before any buffer is allocated)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._error(
                f"{self.path}: {what} claims bytes {offset} to {offset + length}, but the file has {self.size} bytes; "
                "is the file truncated, or its metadata corrupt?"
            )

    def readinto(self, buffer: Any, offset: int) -> None:
        """Fill `buffer` with the bytes at `offset`; the range must lie inside the file (check_range first)."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise self._error(
                    f"{self.path}: ends at byte {offset + done}, expected at least {offset + len(view)}; was it "
                    f"truncated while being read?"
                )
            done += n

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """`length` bytes at `offset` (to the end by default): one positional read into the bytes returned (no zeroed
        buffer, no copy), finished by `readinto` when it comes back short."""
        length = self.size - offset if length is None else length
        self.check_range(offset, length, "a read")
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        buffer = bytearray(length)
        buffer[: len(data)] = data
        self.readinto(memoryview(buffer)[len(data) :], offset + len(data))
        return bytes(buffer)

    @property
    def name(self) -> str:
        """A name that opens exactly this file, for libraries that only take names (Linux: /proc/self/fd/N)."""
        proc = f"/proc/self/fd/{self.fd}"
        return proc if os.path.exists(proc) else str(self.path)


@contextlib.contextmanager
def open_regular(
    path: str | Path, *, within: str | Path | None = None, error: type[ExportError] = ExportError, what: str = "a file"
) -> Iterator[RegularFile]:
    """Open `path` for reading if it is a regular file (inside `within`, when given); see the module docstring."""
    path = Path(path)
    try:
        target = os.path.realpath(path)
        if within is not None and not any(_inside(target, root) for root in _allowed_roots(Path(within))):
            raise error(
                f"{path}: a symbolic link to {target}, outside {within}; expected {what} inside the directory "
                f"being read"
            )
        before = os.stat(target)
        if not stat.S_ISREG(before.st_mode):
            raise error(f"{path}: expected {what}, found {_kind(before.st_mode)}")
        fd = os.open(
            target,
            os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0),
        )
    except FileNotFoundError:
        raise error(f"{path}: missing; expected {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be opened ({exc.strerror or exc}); expected {what}") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            raise error(
                f"{path}: changed while being opened (now "
                f"{_kind(opened.st_mode) if not stat.S_ISREG(opened.st_mode) else 'another file'}); expected {what}"
            )
        yield RegularFile(path, fd, opened.st_size, error)
    finally:
        os.close(fd)


def read_bytes(
    path: str | Path,
    *,
    limit: int,
    within: str | Path | None = None,
    error: type[ExportError] = ExportError,
    what: str = "a file",
) -> bytes:
    """The whole file, if it is a regular file of at most `limit` bytes."""
    with open_regular(path, within=within, error=error, what=what) as f:
        if f.size > limit:
            raise error(f"{path}: {f.size} bytes; expected {what} of at most {limit} bytes")
        try:
            return f.read()
        except OSError as exc:
            raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_text(
    path: str | Path,
    *,
    limit: int,
    within: str | Path | None = None,
    error: type[ExportError] = ExportError,
    what: str = "a text file",
) -> str:
    raw = read_bytes(path, limit=limit, within=within, error=error, what=what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected {what}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(
    path: str | Path,
    *,
    limit: int = JSON_LIMIT,
    within: str | Path | None = None,
    error: type[ExportError] = ExportError,
    what: str = "a JSON document",
) -> Any:
    """A JSON document (no NaN or Infinity literals), read as above."""
    text = read_text(path, limit=limit, within=within, error=error, what=what)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise error(f"{path}: not readable JSON (nested too deeply); expected {what}") from None
    except ValueError as exc:
        raise error(f"{path}: not readable JSON ({' '.join(str(exc).split())[:200]}); expected {what}") from None


def read_yaml(
    path: str | Path,
    *,
    limit: int = YAML_LIMIT,
    within: str | Path | None = None,
    error: type[ExportError] = ExportError,
    what: str = "a YAML document",
) -> Any:
    """A YAML document through yaml.safe_load (plain data only), read as above."""
    import yaml

    text = read_text(path, limit=limit, within=within, error=error, what=what)
    try:
        document = yaml.safe_load(text)
        check_tree(document, 4 * len(text) + (1 << 16))  # aliases share nodes: `[*a, *a, ...]` nested, walked
        return document
    except RecursionError:
        raise error(f"{path}: not readable YAML (nested too deeply); expected {what}") from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        raise error(f"{path}: not readable YAML ({' '.join(str(exc).split())[:200]}); expected {what}") from None
