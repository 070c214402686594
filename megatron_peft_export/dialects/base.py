"""What a dialect reports for one module: its adapter tensors, their role and tensor-parallel split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.shards import Role


@dataclass(frozen=True)
class FoundTensor:
    """An adapter tensor a dialect found on a module."""

    role: Role
    tensor: torch.Tensor
    alpha: float
    split_dim: int | None
    part: str | None = None


def tp_split_dim(tensor: torch.Tensor) -> int | None:
    """Megatron's own marking of a tensor-parallel parameter; None when every TP rank holds all of it."""
    return tensor.partition_dim if getattr(tensor, "tensor_model_parallel", False) else None
