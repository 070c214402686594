"""Reading saved Megatron checkpoints: find the iteration, its recorded settings, and adapter tensors only."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ExportError
from ..hook import TRACKER, tracker_iteration

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


class TorchDistReader:
    """Reads single keys of a torch_dist checkpoint; bytes of other keys (base weights, optimizer) are never read."""

    def __init__(self, directory: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.directory = directory
        self._reader = FileSystemReader(str(directory))
        try:
            self._metadata = self._reader.read_metadata()
        except Exception as exc:
            raise CheckpointError(f"{directory / '.metadata'}: cannot be read ({type(exc).__name__}: {exc}); is the checkpoint truncated?") from exc

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.size) for k, v in self._metadata.state_dict_metadata.items() if hasattr(v, "size")}

    def dtype(self, key: str) -> str:
        return str(self._metadata.state_dict_metadata[key].properties.dtype).removeprefix("torch.")

    def load(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        meta = self._metadata.state_dict_metadata[key]
        buffer = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assumes a single process": it is one, by design
                load(buffer, storage_reader=self._reader, no_dist=True)
        except (Exception, CheckpointException) as exc:
            raise CheckpointError(f"{self.directory}: reading {key} failed ({type(exc).__name__}); is a .distcp file truncated or missing?") from exc
        return buffer[key]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
