"""The legacy Megatron format: one `mp_rank_XX[_YYY]/model_optim_rng.pt` per (TP, PP) rank, local names and shards.

Files are opened with `torch.load(weights_only=True, mmap=True)`: nothing is unpickled beyond plain
data, and only the adapter tensors' pages are read. Local layer indices become global with the
uniform pipeline split; the TP split of each tensor follows its dialect's rule for the base module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..core.shards import ShardSpec
from .checkpoint import CheckpointError, RecordedSettings, safe_torch_load
from .keys import AdapterKey, OfflineShard, classify

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_COLUMN_PARALLEL = ("linear_qkv", "linear_fc1", "output_layer")
# (dialect, base is column-parallel, role) -> tensor-parallel split dim of the saved local tensor
_SPLIT = {
    ("modelopt", True, "lora_A"): None, ("modelopt", True, "lora_B"): 0,
    ("modelopt", False, "lora_A"): 1, ("modelopt", False, "lora_B"): None,
    ("megatron-bridge", True, "lora_A"): 0, ("megatron-bridge", True, "lora_B"): 0, ("megatron-bridge", True, "magnitude"): 0,
    ("megatron-bridge", False, "lora_A"): 1, ("megatron-bridge", False, "lora_B"): 0, ("megatron-bridge", False, "magnitude"): None,
}


@dataclass
class LegacyReader:
    """The rank files of one iteration, opened lazily (memory-mapped)."""

    directory: Path

    def __post_init__(self) -> None:
        self.files: dict[tuple[int, int], Path] = {}
        for path in sorted(self.directory.glob("mp_rank_*/model_optim_rng.pt")):
            match = _RANK_DIR.match(path.parent.name)
            if match:
                self.files[(int(match.group(1)), int(match.group(2) or 0))] = path
        self.tp_size = 1 + max(tp for tp, _ in self.files)
        self.pp_size = 1 + max(pp for _, pp in self.files)
        missing = [f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if self.pp_size > 1 else "") for tp in range(self.tp_size) for pp in range(self.pp_size) if (tp, pp) not in self.files]
        if missing:
            raise CheckpointError(f"{self.directory}: rank files missing for {', '.join(missing)}; expected all {self.tp_size}x{self.pp_size} of them")
        self._states: dict[tuple[int, int], dict] = {}

    def state(self, tp: int, pp: int) -> dict:
        if (tp, pp) not in self._states:
            self._states[(tp, pp)] = safe_torch_load(self.files[(tp, pp)], mmap=True)
        return self._states[(tp, pp)]

    def settings(self) -> RecordedSettings:
        first = self.state(0, 0)
        modelopt = (first.get("modelopt_state") or {}).get("modelopt_state_dict", [])
        return RecordedSettings(args=first.get("args"), modelopt_peft=[e[1]["config"] for e in modelopt if e[0] == "peft"] or None)

    def model_state(self, tp: int, pp: int) -> dict[str, Any]:
        state = self.state(tp, pp)
        if "model" not in state:
            raise CheckpointError(f"{self.files[(tp, pp)]}: no 'model' entry (found {sorted(state)[:6]}); virtual-pipeline legacy checkpoints are not supported")
        return state["model"]

    def load(self, key: str) -> torch.Tensor:
        tp, pp, name = key.split(":", 2)
        return self.model_state(int(tp), int(pp))[name]

    def load_many(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((key, self.load(key)) for key in keys)

    def adapter_keys(self, num_layers: int) -> list[tuple[AdapterKey, tuple[int, int], tuple[int, ...], str]]:
        """(AdapterKey with GLOBAL layer numbers, (tp, pp), local shape, dtype) for every adapter tensor of every rank file."""
        if num_layers % self.pp_size:
            raise CheckpointError(f"{self.directory}: {num_layers} layers do not split evenly over {self.pp_size} pipeline stages; uneven legacy layouts are not supported")
        per_stage = num_layers // self.pp_size
        found = []
        for (tp, pp) in sorted(self.files):
            for name, tensor in self.model_state(tp, pp).items():
                if not isinstance(tensor, torch.Tensor) or "_extra_state" in name:
                    continue
                key = classify(name)
                if key is None:
                    continue
                module = re.sub(r"^decoder\.layers\.(\d+)", lambda m: f"decoder.layers.{int(m.group(1)) + pp * per_stage}", key.module)
                found.append((AdapterKey(f"{tp}:{pp}:{name}", key.dialect, module, key.role, key.part, key.adapter_name), (tp, pp), tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
        return found


def legacy_shard(found: AdapterKey, tp: int, tp_size: int, shape: tuple[int, ...], alpha: float, dtype: str) -> OfflineShard:
    column = found.module.rsplit(".", 1)[-1] in _COLUMN_PARALLEL
    spec = ShardSpec(module=found.module, role=found.role, part=found.part, shape=shape, split_dim=_SPLIT[(found.dialect, column, found.role)],
                     tp_rank=tp, tp_size=tp_size, alpha=alpha, dtype=dtype)
    return OfflineShard(spec, found.key, (), None)
