"""What a dialect reports for one module: its adapter tensors, their role and tensor-parallel split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    tp_group: Any = None
    """The process group the owning megatron linear is split over (expert linears: expert TP); None: the model's TP
    group."""
    expert: int | None = None
    """On a grouped-experts linear (one GEMM per local expert): the local expert this tensor is for."""


@dataclass(frozen=True)
class Refusal:
    """What a dialect yields, instead of tensors, for a module whose model math no HF adapter reproduces.

    `reason` is one message with `{modules}` where the refused modules go: `collect` gathers them with their
    global paths, and the export refuses them all, named, in one error on every rank.
    """

    reason: str


def owner_group(linear: torch.nn.Module) -> Any:
    """A megatron linear's own tensor-parallel group (ModelOpt's LoRA layers on experts use the regular TP group)."""
    return getattr(linear, "tp_group", None)


def tp_split_dim(tensor: torch.Tensor) -> int | None:
    """Megatron's own marking of a tensor-parallel parameter; None when every TP rank holds all of it."""
    return tensor.partition_dim if getattr(tensor, "tensor_model_parallel", False) else None


def at_path(module: Any, path: str) -> Any:
    """The attribute at a dotted path under `module` (a declared leaf, core/registry.py), or None where it stops."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def leaf_owner(module: Any, leaf: str) -> Any:
    """The module that holds a declared leaf's tensor (its linear)."""
    return at_path(module, leaf.rsplit(".", 1)[0])
