"""Shards and placements: the plain data the core works on.

A shard is one adapter tensor as one rank holds it; a placement says which slice of which
HF tensor a slice of that shard fills. Placements are computed from metadata alone, so the
writer can allocate every HF tensor before a single byte moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

Role = Literal["lora_A", "lora_B", "magnitude"]
ROLES: tuple[Role, ...] = ("lora_A", "lora_B", "magnitude")


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    """One local adapter tensor and where it sits in its global Megatron tensor."""

    module: str
    """Megatron module path with the GLOBAL layer index, e.g. `decoder.layers.3.mlp.linear_fc1`."""
    role: Role
    """lora_A ([r, in]), lora_B ([out, r]) or the DoRA magnitude ([out])."""
    shape: tuple[int, ...]
    """Local shape on this rank."""
    split_dim: int | None
    """Tensor-parallel split axis, or None when every TP rank holds the whole tensor."""
    tp_rank: int
    tp_size: int
    alpha: float
    """HF lora_alpha for this module: the LoRA output is scaled by alpha / r."""
    part: str | None = None
    """CanonicalLoRA sub-adapter (q, k, v, gate, up) of a fused module; None for the fused adapter."""
    dtype: str = "float32"

    @property
    def is_replica(self) -> bool:
        """True for a copy that another TP rank holds too; only TP rank 0's copy is exported."""
        return self.split_dim is None and self.tp_rank != 0

    @property
    def global_shape(self) -> tuple[int, ...]:
        if self.split_dim is None:
            return self.shape
        dims = list(self.shape)
        dims[self.split_dim] *= self.tp_size
        return tuple(dims)

    def describe(self) -> str:
        part = f" ({self.part})" if self.part else ""
        return f"{self.module}{part} {self.role} shape {self.shape} at tp_rank {self.tp_rank}/{self.tp_size}"


class Placement(NamedTuple):
    """Copy `length` entries along `dim`, from `src_start` in the shard to `dst_start` in the HF tensor (a named tuple:
    an MoE export makes 10^5 of them)."""

    key: str
    shape: tuple[int, ...]
    dim: int
    dst_start: int
    src_start: int
    length: int
