"""Publish a directory whole or not at all: write into a hidden temporary sibling, fsync, rename."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import OutputError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "README.md"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Create the temporary sibling that will become `output_dir`; fail early if it cannot be published."""
    out = Path(output_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; expected a new directory. Pass overwrite=True (--overwrite) to replace it.")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write the adapter next to {out}: {exc.strerror} ({exc.filename}); expected a writable directory") from exc
    return tmp


def write_staging(tmp: Path, *, tensors: dict[str, torch.Tensor], config: dict[str, Any], card: str, extra_files: dict[str, bytes] | None = None) -> None:
    """Fill the staging directory (plus `extra_files`, relative path -> bytes) and fsync it; on failure remove it."""
    try:
        files = {ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), MODEL_CARD: card.encode(), **(extra_files or {})}
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
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"writing the adapter into {tmp.parent} failed: {exc}") from exc
        raise


def publish(tmp: Path, output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Rename the staging directory into place (replacing the old one only with overwrite)."""
    out = Path(output_dir).absolute()
    old = None
    try:
        if out.exists():
            if not overwrite:
                raise OutputError(f"{out} appeared while the adapter was being written; nothing was replaced")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        _fsync(out.parent)
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"publishing the adapter to {out} failed: {exc}") from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
