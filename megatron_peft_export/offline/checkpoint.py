"""Reading saved Megatron checkpoints: find the iteration, its recorded settings, and adapter tensors only."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import pickle
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from ..errors import ExportError
from ..hook import TRACKER, tracker_iteration
from .torch_save import NotPlainTensor, decode

log = logging.getLogger("megatron_peft_export")


class CheckpointError(ExportError):
    """The path is not a readable Megatron checkpoint of a supported format."""


def iteration_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())


def locate(path: str | Path) -> Path:
    """An iteration directory, or a save directory resolved through its tracker file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (iter_XXXXXXX or a save directory), found {'a file' if path.exists() else 'nothing'}")
    if (path / TRACKER).exists():
        iteration = tracker_iteration(path)
        if iteration is None:
            raise CheckpointError(f"{path / TRACKER}: expected an iteration number, found {(path / TRACKER).read_text()[:40]!r}")
        return path / f"iter_{iteration:07d}"
    return path


def checkpoint_format(directory: Path) -> str:
    if (directory / ".metadata").is_file():
        return "torch_dist"
    if any(directory.glob("mp_rank_*/model_optim_rng.pt")):
        return "legacy"
    found = sorted(p.name for p in directory.iterdir())[:8] if directory.is_dir() else []
    raise CheckpointError(
        f"{directory}: expected a Megatron checkpoint (torch_dist .metadata, or mp_rank_*/model_optim_rng.pt), found {found or 'no files'}; "
        "pass an iter_XXXXXXX directory or a save directory with latest_checkpointed_iteration.txt"
    )


def _import_megatron_quietly() -> None:
    """megatron.core allow-lists argparse.Namespace and its enums for weights_only loads; its import is noisy."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import megatron.core  # noqa: F401


def safe_torch_load(path: Path, mmap: bool = False) -> Any:
    """weights_only always: a checkpoint that needs arbitrary unpickling is refused, never executed."""
    _import_megatron_quietly()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused, it needs unsafe unpickling ({str(exc).splitlines()[0]}); only weights_only loads are done") from exc
    except (OSError, RuntimeError, EOFError) as exc:
        if mmap and "mmap can only be used" in str(exc):  # a file in torch's older (non-zip) format: read it whole
            return safe_torch_load(path, mmap=False)
        raise CheckpointError(f"{path}: cannot be read ({exc}); is the file truncated or corrupt?") from exc


@dataclass
class RecordedSettings:
    """What a checkpoint says about itself: Megatron-LM args, Bridge's run_config.yaml, ModelOpt's PEFT config."""

    args: Any = None
    run_config: dict | None = None
    modelopt_peft: list[dict] | None = None


def read_settings(directory: Path) -> RecordedSettings:
    settings = RecordedSettings()
    common = directory / "common.pt"
    if common.is_file():
        settings.args = (safe_torch_load(common) or {}).get("args")
    run_config = directory / "run_config.yaml"
    if run_config.is_file():
        try:
            settings.run_config = yaml.safe_load(run_config.read_text())
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{run_config}: not valid YAML ({exc})") from exc
    modelopt = directory / "modelopt_state" / "common.pt"
    if modelopt.is_file():
        state = safe_torch_load(modelopt) or {}
        settings.modelopt_peft = [entry[1]["config"] for entry in state.get("modelopt_state_dict", []) if entry[0] == "peft"]
    return settings


def modelopt_alpha(peft_configs: list[dict], adapter_name: str, module: str, rank: int) -> float | None:
    """alpha = scale * r from ModelOpt's saved PEFT config: the merged settings of every pattern matching the module."""
    for config in peft_configs:
        if config.get("adapter_name") != adapter_name:
            continue
        merged: dict = {}
        for pattern, setting in config.get("adapter_cfg", {}).items():
            if isinstance(pattern, str) and fnmatch(module, pattern):
                merged.update(setting)
        if not merged:
            return None
        if merged.get("rank", rank) != rank:
            raise CheckpointError(
                f"{module}: ModelOpt's saved config gives rank {merged['rank']} but the tensors have rank {rank}; "
                "layer-specific patterns under pipeline parallelism match stage-local names. Pass --lora-alpha."
            )
        return float(merged.get("scale", 1.0)) * rank
    return None


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint.filesystem")


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names a class or function outside the allowed ones."""


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's `.metadata` is a pickle; only its plain data classes may be built from it."""

    def find_class(self, module: str, name: str) -> Any:
        import dataclasses
        import enum

        found = None
        if module in _METADATA_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if not (isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))):
                found = None
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            found = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            found = torch.serialization._get_layout
        elif (module, name) == ("collections", "OrderedDict"):
            import collections

            found = collections.OrderedDict
        if found is None:
            raise _RefusedGlobal(f"{module}.{name} is not allowed in checkpoint metadata")
        return found


def _safe_reader(directory: Path):
    """torch's FileSystemReader, with `.metadata` read by the restricted unpickler (torch itself uses plain pickle.load)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        _metadata_cache = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if self._metadata_cache is None:
                with open(directory / ".metadata", "rb") as f:
                    self._metadata_cache = _MetadataUnpickler(f).load()
            metadata = self._metadata_cache
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeFileSystemReader(str(directory))


READ_BATCH_BYTES = 256 * 2**20
"""Adapter bytes the offline exporter reads ahead: one batch of stored items, decoded together."""


class TorchDistReader:
    """Reads single keys of a torch_dist checkpoint; bytes of other keys (base weights, optimizer) are never read.

    `.metadata` is unpickled with a restricted unpickler (torch's plain data classes only), and every data
    file it names must be a plain file name inside the checkpoint directory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._reader = _safe_reader(directory)
        try:
            self._metadata = self._reader.read_metadata()
            state = self._metadata.state_dict_metadata
            storage = self._metadata.storage_data or {}
        except _RefusedGlobal as exc:
            raise CheckpointError(f"{directory / '.metadata'}: refused, it needs unsafe unpickling ({str(exc).splitlines()[0]}); only torch's checkpoint metadata classes are loaded") from exc
        except Exception as exc:
            raise CheckpointError(f"{directory / '.metadata'}: cannot be read ({type(exc).__name__}: {exc}); is the checkpoint truncated?") from exc
        if not isinstance(state, dict) or not isinstance(storage, dict):
            raise CheckpointError(f"{directory / '.metadata'}: expected torch.distributed.checkpoint metadata, found {type(self._metadata).__name__}")
        outside = sorted({str(getattr(info, "relative_path", "")) for info in storage.values()
                          if not _plain_file_name(getattr(info, "relative_path", None))})
        if outside:
            raise CheckpointError(f"{directory / '.metadata'}: refused, it names data files outside the checkpoint directory ({', '.join(outside[:3])})")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.size) for k, v in self._metadata.state_dict_metadata.items() if hasattr(v, "size")}

    def dtype(self, key: str) -> str:
        return str(self._metadata.state_dict_metadata[key].properties.dtype).removeprefix("torch.")

    def load(self, key: str) -> torch.Tensor:
        return next(self.load_many([key]))[1]

    def load_many(self, keys: list[str], budget: int = READ_BATCH_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for each key in order, read in batches of up to `budget` bytes (a larger tensor is read alone).

        Each stored item is read with one `readinto` of its byte range, in file order, and decoded in memory
        (offline/torch_save.py); a batch holding an item that decoder does not take (compressed, zip64, other
        encodings) is read by torch.distributed.checkpoint.load instead. The budget bounds what is read ahead.
        """
        batch: list[str] = []
        size = 0
        for key in keys:
            meta = self._metadata.state_dict_metadata[key]
            nbytes = math.prod(meta.size) * meta.properties.dtype.itemsize
            if batch and size + nbytes > budget:
                yield from self._load_batch(batch)
                batch, size = [], 0
            batch.append(key)
            size += nbytes
        if batch:
            yield from self._load_batch(batch)

    def _load_batch(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            try:
                tensors = self._read_items(keys)
            except NotPlainTensor as exc:
                log.debug("%s: %s; reading this batch with torch.distributed.checkpoint", self.directory, exc)
                tensors = self._read_with_torch(keys)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:
            what = keys[0] if len(keys) == 1 else f"{keys[0]} (and {len(keys) - 1} more tensors)"
            raise CheckpointError(f"{self.directory}: reading {what} failed ({type(exc).__name__}); is a .distcp file truncated or missing?") from exc
        for key in keys:
            yield key, tensors.pop(key)

    def _read_items(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The keys' stored items, each read by one `readinto` of its byte range (in file order) and decoded in memory."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        state, storage = self._metadata.state_dict_metadata, self._metadata.storage_data
        items = []
        for key in keys:
            meta = state[key]
            if sum(math.prod(chunk.sizes) for chunk in meta.chunks) != math.prod(meta.size):
                raise CheckpointError(f"{self.directory}: {key} is not fully stored (its chunks cover part of {list(meta.size)}); is the checkpoint complete?")
            for chunk in meta.chunks:
                info = storage[MetadataIndex(key, chunk.offsets)]
                if getattr(info, "transform_descriptors", None):
                    raise NotPlainTensor(f"{key} is stored transformed ({', '.join(info.transform_descriptors)})")
                items.append((info.relative_path, info.offset, info.length, key, chunk))
        tensors: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as files:
            opened: dict[str, Any] = {}
            for relative_path, offset, length, key, chunk in sorted(items, key=lambda item: item[:2]):
                if relative_path not in opened:
                    opened[relative_path] = files.enter_context(open(self.directory / relative_path, "rb", buffering=0))
                blob = bytearray(length)
                opened[relative_path].seek(offset)
                if opened[relative_path].readinto(blob) != length:
                    raise EOFError(f"{relative_path} ends before byte {offset + length}")
                part = decode(blob)
                meta = state[key]
                if part.shape != tuple(chunk.sizes) or part.dtype != meta.properties.dtype:
                    raise NotPlainTensor(f"{key}: stored {part.dtype} {list(part.shape)}, metadata says {meta.properties.dtype} {list(chunk.sizes)}")
                if tuple(chunk.sizes) == tuple(meta.size):
                    tensors[key] = part
                    continue
                if key not in tensors:
                    tensors[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                tensors[key][tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))] = part
        return tensors

    def _read_with_torch(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import load

        buffers = {}
        for key in keys:
            meta = self._metadata.state_dict_metadata[key]
            buffers[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assumes a single process": it is one, by design
            load(buffers, storage_reader=self._reader, no_dist=True)
        return buffers


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
