"""The legacy Megatron format: one `mp_rank_XX[_YYY]/model_optim_rng.pt` per (TP, PP) rank, local names and shards.

Files are read by torch_save.load_torch_file (no torch.load; nothing is built beyond plain data and tensor
records), and only the adapter tensors' bytes are read. Local layer indices become global with the
uniform pipeline split; the TP split of each tensor is its dialect's declaration for the base module (core/registry.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.shards import ShardSpec
from ..io.torch_save import StoredTensor
from .checkpoint import CheckpointError, RecordedSettings, modelopt_peft_configs, read_stored, torch_file
from .keys import AdapterKey, OfflineShard, classify

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


@dataclass
class LegacyReader:
    """The rank files of one iteration, read lazily: each file's names and tensor records, then adapter tensors'
    bytes."""

    directory: Path

    def __post_init__(self) -> None:
        self.files: dict[tuple[int, int], Path] = {}
        for path in sorted(self.directory.glob("mp_rank_*/model_optim_rng.pt")):
            match = _RANK_DIR.match(path.parent.name)
            if match:
                self.files[(int(match.group(1)), int(match.group(2) or 0))] = path
        if not self.files:
            raise CheckpointError(f"{self.directory}: no rank file named mp_rank_XX[_YYY]/model_optim_rng.pt")
        self.tp_size = 1 + max(tp for tp, _ in self.files)
        self.pp_size = 1 + max(pp for _, pp in self.files)
        missing = [
            f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if self.pp_size > 1 else "")
            for tp in range(self.tp_size)
            for pp in range(self.pp_size)
            if (tp, pp) not in self.files
        ]
        if missing:
            raise CheckpointError(
                f"{self.directory}: rank files missing for {', '.join(missing)}; expected all "
                f"{self.tp_size}x{self.pp_size} of them"
            )
        self._states: dict[tuple[int, int], dict] = {}

    def state(self, tp: int, pp: int) -> dict:
        if (tp, pp) not in self._states:
            with torch_file(self.files[(tp, pp)], self.directory) as (state, _):
                if not isinstance(state, dict):
                    raise CheckpointError(
                        f"{self.files[(tp, pp)]}: expected Megatron's checkpoint state (a mapping), found "
                        f"{type(state).__name__}"
                    )
                self._states[(tp, pp)] = state
        return self._states[(tp, pp)]

    def settings(self) -> RecordedSettings:
        first = self.state(0, 0)
        return RecordedSettings(
            args=first.get("args"),
            modelopt_peft=modelopt_peft_configs(first.get("modelopt_state"), self.files[(0, 0)]) or None,
        )

    def model_state(self, tp: int, pp: int) -> dict[str, Any]:
        state = self.state(tp, pp)
        if not isinstance(state.get("model"), dict):
            raise CheckpointError(
                f"{self.files[(tp, pp)]}: no 'model' mapping (found {sorted(map(str, state))[:6]}); "
                f"virtual-pipeline legacy checkpoints are not supported"
            )
        return state["model"]

    def load(self, key: str) -> torch.Tensor:
        tp, pp, name = key.split(":", 2)
        stored = self.model_state(int(tp), int(pp))[name]
        return read_stored(stored, self.files[(int(tp), int(pp))], self.directory)

    def load_many(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((key, self.load(key)) for key in keys)

    def adapter_keys(self, num_layers: int) -> list[tuple[AdapterKey, tuple[int, int], tuple[int, ...], str]]:
        """(AdapterKey with GLOBAL layer numbers, (tp, pp), local shape, dtype) for every adapter tensor of every rank
        file."""
        if num_layers % self.pp_size:
            raise CheckpointError(
                f"{self.directory}: {num_layers} layers do not split evenly over {self.pp_size} pipeline stages; "
                f"uneven legacy layouts are not supported"
            )
        per_stage = num_layers // self.pp_size
        found = []
        for tp, pp in sorted(self.files):
            spans = []
            for name, tensor in self.model_state(tp, pp).items():
                if not isinstance(tensor, StoredTensor) or not isinstance(name, str) or "_extra_state" in name:
                    continue
                key = classify(name)
                if key is None:
                    continue
                spans.append((tensor.storage.member.name, *tensor.span(), name))
                module = re.sub(
                    r"^decoder\.layers\.(\d+)",
                    lambda m: f"decoder.layers.{int(m.group(1)) + pp * per_stage}",  # noqa: B023 (called at once by re.sub)
                    key.module,
                )
                found.append(
                    (
                        dataclasses.replace(key, key=f"{tp}:{pp}:{name}", module=module, axes=""),
                        (tp, pp),
                        tuple(tensor.shape),
                        str(tensor.dtype).removeprefix("torch."),
                    )
                )
            spans.sort()
            for (storage, _start, end, name), (other, next_start, _, next_name) in zip(spans, spans[1:]):
                # two adapter tensors over the same bytes: no real save does that
                if storage == other and next_start < end:
                    raise CheckpointError(
                        f"{self.files[(tp, pp)]}: adapter tensors {name} and {next_name} share stored bytes; is "
                        f"the file corrupt?"
                    )
        return found


def legacy_shard(
    found: AdapterKey, tp: int, tp_size: int, shape: tuple[int, ...], alpha: float, dtype: str
) -> OfflineShard:
    spec = ShardSpec(
        module=found.module,
        role=found.role,
        part=found.part,
        shape=shape,
        split_dim=found.tensor.split_dim(found.module),
        tp_rank=tp,
        tp_size=tp_size,
        alpha=alpha,
        dtype=dtype,
    )
    return OfflineShard(spec, spec.module, found.key, (), None)
