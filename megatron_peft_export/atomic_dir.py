"""Publish a directory whole or not at all: write into a hidden temporary sibling, fsync, rename.

Siblings are named `.<name>.tmp-<host>-<pid>-<hex>` (staging) and `.<name>.old-<host>-<pid>-<hex>` (the
replaced directory, during an overwrite), so a later export can tell leftovers of a process that died
(same host, pid gone; or another host's, untouched for STALE_AFTER) from a live export's, and clean them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import OutputError

log = logging.getLogger("megatron_peft_export")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "README.md"
STALE_AFTER = 24 * 3600.0
"""Seconds after which a leftover of another host (whose process cannot be checked) counts as abandoned."""
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-)?[0-9a-f]{8}$")
_LOCK = threading.RLock()
_LIVE: dict[Path, bool] = {}
"""This process's staging directories -> abandoned (at shutdown: `publish` then refuses them)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
    """Remove what interrupted exports to `output_dir` left behind (staging, a replaced directory), if their process is gone.

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
            if kind == "old" and not out.exists():
                path.rename(out)
                log.warning("restored %s from %s, set aside by an export that was interrupted while replacing it", out, path.name)
            else:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, left behind by an interrupted export", path)
    return [path for _, path in found]


def staging_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Create the temporary sibling that will become `output_dir`; fail early if it cannot be published.

    Leftovers of earlier interrupted exports to the same directory are cleaned first (`clean_stale`).
    """
    out = Path(output_dir).absolute()
    if out.parent.is_dir():
        clean_stale(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; expected a new directory. Pass overwrite=True (--overwrite) to replace it.")
    tmp = _sibling(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write the adapter next to {out}: {exc.strerror} ({exc.filename}); expected a writable directory") from exc
    with _LOCK:
        _LIVE[tmp] = False
    return tmp


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))  # safetensors' Rust I/O errors
    return int(found.group(1)) if found else None


def write_failure(exc: BaseException, where: Path, nbytes: int) -> str:
    """One line saying why writing into `where` failed and what to do."""
    code = _errno(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device of {where} (or the disk quota is exhausted): the adapter needs about "
                f"{nbytes / 2**20:.1f} MiB; free space or write it elsewhere. Nothing was published")
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; write the adapter elsewhere. Nothing was published"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied writing into {where}; expected a directory this process may write. Nothing was published"
    return f"writing the adapter into {where} failed: {exc}. Nothing was published"


def write_staging(tmp: Path, *, tensors: dict[str, torch.Tensor], config: dict[str, Any], card: str, extra_files: dict[str, bytes] | None = None) -> None:
    """Fill the staging directory (plus `extra_files`, relative path -> bytes) and fsync it; on failure remove it."""
    files = {ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), MODEL_CARD: card.encode(), **(extra_files or {})}
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, data in files.items():
            path = (tmp / name).resolve()
            if tmp.resolve() not in path.parents:
                raise OutputError(f"refusing to write {name!r} outside the adapter directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for name in (ADAPTER_WEIGHTS, *files):
            _fsync(tmp / name)
        _fsync(tmp)
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, (OSError, SafetensorError)):
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(len(d) for d in files.values())
            raise OutputError(write_failure(exc, tmp.parent, nbytes)) from exc
        raise


def publish(tmp: Path, output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Rename the staging directory into place (replacing the old one only with overwrite)."""
    out = Path(output_dir).absolute()
    old = None
    with _LOCK:
        try:
            if _LIVE.get(tmp):
                raise OutputError(f"the export to {out} was abandoned at shutdown; nothing was published")
            if out.exists():
                if not overwrite:
                    raise OutputError(f"{out} appeared while the adapter was being written; nothing was replaced")
                old = _sibling(out, "old")
                out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                if old is not None:
                    old.rename(out)  # the previous adapter goes back
                    old = None
                raise
            _fsync(out.parent)
        except BaseException as exc:
            discard(tmp)
            if isinstance(exc, OSError):
                raise OutputError(f"publishing the adapter to {out} failed: {exc}") from exc
            raise
        finally:
            _LIVE.pop(tmp, None)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    with _LOCK:
        _LIVE.pop(tmp, None)


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
    finally:
        _LOCK.release()
    return abandoned
