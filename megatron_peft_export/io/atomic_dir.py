"""Publish a directory whole or not at all: write into a hidden temporary sibling, fsync, rename.

An output never touches an input: it may not be, contain or lie inside the checkpoint being read (nor be or
contain another input, such as the base model's directory), and an existing output is replaced only when it
is an adapter directory this tool published (`is_published_adapter`), and only with overwrite.

Siblings are named `.<name>.tmp-<host>-<pid>-<hex>` (staging) and `.<name>.old-<host>-<pid>-<hex>` (the
replaced directory, during an overwrite), so a later export can tell leftovers of a process that died
(same host, pid gone; or another host's, untouched for STALE_AFTER) from a live export's, and clean them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..core.peft_format import is_ours
from ..core.peft_names import ADAPTER_CONFIG, MAX_CARD_BYTES, MODEL_CARD
from ..errors import OutputError

log = logging.getLogger("megatron_peft_export")
STALE_AFTER = 24 * 3600.0
"""Seconds after which a leftover of another host (whose process cannot be checked) counts as abandoned."""
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-)?[0-9a-f]{8}$")
_LOCK = threading.RLock()
_LIVE: dict[Path, bool] = {}
"""This process's staging directories -> abandoned (at shutdown: `publish` then refuses them)."""
_CREATED: dict[Path, list[Path]] = {}
"""Staging directory -> the missing parents `staging_dir` created for it (deepest first), removed again if nothing is
published."""


def _dir_mode() -> int:
    """What a directory this process makes now gets (0o777 less the umask, read at each publish, so a umask set after
    import counts). The staging directory has 0o700 until it is published, so a user of the same group (a umask of
    002 on a shared cluster) cannot put a link to one of our files into it between its creation and our write of
    that file (the write would follow it). Linux reports the umask in /proc/self/status without changing it;
    elsewhere it is read by setting it and back (briefly process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def _open_up(tmp: Path) -> None:
    """Give the staging directory (made 0o700) the mode of a directory made under the umask, before it is published;
    through a descriptor that refuses a link in its place."""
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, _dir_mode())
    finally:
        os.close(fd)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    """Remove what is at `path`: a directory tree, or a file, symbolic link or other entry (a link is never
    followed)."""
    try:
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def _published(path: Path) -> bool:
    """Whether `path` is an adapter directory this tool published (the only kind an overwrite replaces)."""
    return is_published_adapter(path)


def is_published_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter directory this tool published: a directory (not a link) holding regular files
    adapter_config.json and README.md, the card carrying the `megatron-peft-export` tag model_card has always written.

    A directory whose card was replaced or removed, a file, a link or anything else is not: no overwrite replaces it.
    """
    path = Path(path)
    try:
        if not stat.S_ISDIR(path.lstat().st_mode) or not stat.S_ISREG((path / ADAPTER_CONFIG).lstat().st_mode):
            return False
        card = path / MODEL_CARD
        if not stat.S_ISREG(card.lstat().st_mode) or card.lstat().st_size > MAX_CARD_BYTES:
            return False
        with open(card, "rb") as f:
            return is_ours(f.read(MAX_CARD_BYTES).decode("utf-8", errors="replace"))
    except (OSError, ValueError):
        return False


def _describe(path: Path) -> str:
    """What is at `path`, for a message (a link is not followed)."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return "nothing"
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    if stat.S_ISREG(mode):
        return "a file"
    if not stat.S_ISDIR(mode):
        return "a special file (FIFO, socket or device)"
    return f"a directory without the model card ({MODEL_CARD}) megatron-peft-export writes"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _same_entry(a: Path, b: Path) -> bool:
    """Whether two existing paths are one directory entry (also through bind mounts, which realpath does not see)."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def check_output(
    output_dir: str | os.PathLike,
    overwrite: bool,
    *,
    reading: Sequence[tuple[str | os.PathLike, str]] = (),
    checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Refuse an output that would touch an input, or replace anything but an adapter directory this tool published.

    `reading`: (path, what it is) of every input; the output may not be one of them or contain one (symbolic links
    resolved). `checkpoint`: the checkpoint directory being read; the output may not lie inside it either, except as a
    new (or published adapter) directory directly in it, as the hook and `export --all` write `<iter>/hf_adapter`.
    An existing output must be a published adapter (`is_published_adapter`) and is replaced only with
    `overwrite`.
    """
    out = Path(output_dir).absolute()
    try:
        real = _real(out)
        sources = [(Path(p), what) for p, what in reading if p is not None]
        if checkpoint is not None:
            sources.append((Path(checkpoint), "the checkpoint being read"))
        for source, what in sources:
            source_real = _real(source)
            if real == source_real or (out.exists() and _same_entry(out, source_real)):
                raise OutputError(
                    f"{out} is {what} ({source}); write the adapter to a new directory. Nothing was written"
                )
            if real in source_real.parents or (out.exists() and any(_same_entry(out, p) for p in source_real.parents)):
                raise OutputError(
                    f"{out} contains {what} ({source}), which replacing it would delete; write the adapter to a "
                    f"new directory elsewhere. "
                    "Nothing was written"
                )
        if checkpoint is not None:
            inside = _real(Path(checkpoint))
            if _is_within(real, inside) and real.parent != inside:
                raise OutputError(
                    f"{out} lies inside the checkpoint being read ({checkpoint}); expected a directory outside it, "
                    f"or directly in it "
                    f"(as `export --all` writes {Path(checkpoint) / 'hf_adapter'}). Nothing was written"
                )
        if os.path.lexists(out):
            if not _published(out):
                of_checkpoint = checkpoint is not None and real.parent == _real(Path(checkpoint))
                raise OutputError(
                    f"{out} already exists and is "
                    f"{_describe(out)}{', part of the checkpoint being read' if of_checkpoint else ''}; "
                    "--overwrite (overwrite=True) replaces only an adapter directory written by megatron-peft-export. "
                    "Write the adapter elsewhere, or remove it yourself. Nothing was written"
                )
            if not overwrite:
                raise OutputError(
                    f"{out} already exists; expected a new directory. Pass overwrite=True (--overwrite) to replace it."
                )
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a loop of links
        raise OutputError(f"cannot use {output_dir!r:.200} as the adapter directory: {exc}") from None
    return out


def _owner_alive(path: Path, host: str | None, pid: str | None) -> bool:
    if host == _HOST and pid is not None:
        if int(pid) == os.getpid():
            return path in _LIVE
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True
    try:
        return time.time() - path.lstat().st_mtime < STALE_AFTER
    except OSError:
        return True  # gone already


def clean_stale(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted exports to `output_dir` left behind (staging, a replaced directory), if their process is
    gone.

    A crash between the two renames of an overwrite leaves no `output_dir` and the previous adapter
    aside: it is put back. Returns the leftovers removed or restored.
    """
    out = Path(output_dir).absolute()
    try:
        names = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    except OSError:
        return []
    found = []
    with _LOCK:  # no publish of this process runs meanwhile
        for path in names:
            match = _LEFTOVER.match(path.name)
            if match and match["name"] == out.name and not _owner_alive(path, match["host"], match["pid"]):
                found.append((match["kind"], path))
        for kind, path in sorted(found):  # "old" first: restore before removing staging
            if kind == "old" and not os.path.lexists(out):
                path.rename(out)
                log.warning(
                    "restored %s from %s, set aside by an export that was interrupted while replacing it",
                    out,
                    path.name,
                )
            else:
                _remove(path)
                log.info("removed %s, left behind by an interrupted export", path)
    return [path for _, path in found]


def staging_dir(
    output_dir: str | os.PathLike,
    overwrite: bool,
    *,
    reading: Sequence[tuple[str | os.PathLike, str]] = (),
    checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Create the temporary sibling that will become `output_dir`; fail early if it cannot be published.

    The output is checked against the inputs first (`check_output`: `reading`, `checkpoint`). Leftovers of earlier
    interrupted exports to the same directory are cleaned next (`clean_stale`). Missing parent directories are
    created, and removed again when nothing is published (`discard`).
    """
    out = Path(output_dir).absolute()
    check_output(
        out, True, reading=reading, checkpoint=checkpoint
    )  # nothing is touched for an output that touches an input
    if out.parent.is_dir():
        clean_stale(out)
    check_output(out, overwrite, reading=reading, checkpoint=checkpoint)
    tmp = _sibling(out, "tmp")
    created = [p for p in (out.parent, *out.parent.parents) if not os.path.lexists(p)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o700)  # nobody else can plant a link in it to make a write land elsewhere; see publish
    except OSError as exc:
        for path in created:
            _rmdir(path)
        raise OutputError(
            f"cannot write the adapter next to {out}: {exc.strerror} ({exc.filename}); expected a writable directory"
        ) from exc
    with _LOCK:
        _LIVE[tmp] = False
        _CREATED[tmp] = created
    return tmp


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))  # safetensors' Rust I/O errors
    return int(found.group(1)) if found else None


def write_failure(exc: BaseException, where: Path, nbytes: int) -> str:
    """One line saying why writing into `where` failed and what to do."""
    code = _errno(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device of {where} (or the disk quota is exhausted): the adapter needs about "
            f"{nbytes / 2**20:.1f} MiB; free space or write it elsewhere. Nothing was published"
        )
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; write the adapter elsewhere. Nothing was published"
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied writing into {where}; expected a directory this process may write. "
            "Nothing was published"
        )
    return f"writing the adapter into {where} failed: {exc}. Nothing was published"


def write_file(path: str | os.PathLike, data: bytes, what: str) -> Path:
    """Write one file whole or not at all: a hidden sibling `.<name>.<hex>`, written, fsynced and renamed into place.

    On any failure (a full or read-only disk, an interrupt) the sibling and any parent directory created for it are
    removed, and an OSError becomes one OutputError line saying why and what to do (`what` names the file's role).
    """
    path = Path(path).absolute()
    created = [p for p in (path.parent, *path.parent.parents) if not os.path.lexists(p)]
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
        fsync(path.parent)
        return path
    except BaseException as exc:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        for parent in created:
            _rmdir(parent)
        if isinstance(exc, OSError):
            raise OutputError(_file_failure(exc, path, what)) from None
        raise


def _file_failure(exc: OSError, path: Path, what: str) -> str:
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = f"no space left on the device of {path.parent} (or the disk quota is exhausted)"
    elif code == errno.EROFS:
        reason = f"{path.parent} is on a read-only file system"
    elif code in (errno.EACCES, errno.EPERM):
        reason = f"permission denied writing into {path.parent}"
    else:
        reason = " ".join(str(exc).split())
    return f"cannot write {what} {path}: {reason}; free space or write it elsewhere. Nothing was written"


def publish(tmp: Path, output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Rename the staging directory into place (replacing the old one only with overwrite)."""
    out = Path(output_dir).absolute()
    old = None
    with _LOCK:
        try:
            if _LIVE.get(tmp):
                raise OutputError(f"the export to {out} was abandoned at shutdown; nothing was published")
            _open_up(tmp)
            if os.path.lexists(out):
                if not overwrite:
                    raise OutputError(f"{out} appeared while the adapter was being written; nothing was replaced")
                if not _published(out):
                    raise OutputError(
                        f"{out} is now {_describe(out)}, not an adapter directory written by megatron-peft-export; "
                        "nothing was replaced. Write the adapter elsewhere, or remove it yourself"
                    )
                old = _sibling(out, "old")
                out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                if old is not None:
                    old.rename(out)  # the previous adapter goes back
                    old = None
                raise
            fsync(out.parent)
        except BaseException as exc:
            discard(tmp)
            if isinstance(exc, OSError):
                raise OutputError(f"publishing the adapter to {out} failed: {exc}") from exc
            raise
        finally:
            _LIVE.pop(tmp, None)
            _CREATED.pop(tmp, None)
    if old is not None:
        _remove(old)
    return out


def discard(tmp: Path) -> None:
    """Remove a staging directory, and the parents staging_dir created for it when they are empty."""
    shutil.rmtree(tmp, ignore_errors=True)
    with _LOCK:
        _LIVE.pop(tmp, None)
        created = _CREATED.pop(tmp, [])
    for path in created:
        _rmdir(path)


def abandon_all(timeout: float) -> list[Path]:
    """At shutdown: remove every staging directory of this process; a later `publish` of one refuses it.

    Waits up to `timeout` for a publish in progress (a rename) to finish. Returns the directories removed.
    """
    if not _LOCK.acquire(timeout=max(timeout, 0.0)):
        return []
    try:
        abandoned = [path for path, done in _LIVE.items() if not done]
        for path in abandoned:
            _LIVE[path] = True
            shutil.rmtree(path, ignore_errors=True)
            for parent in _CREATED.pop(path, []):
                _rmdir(parent)
    finally:
        _LOCK.release()
    return abandoned
