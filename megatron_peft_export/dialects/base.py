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


_PLAIN_GETATTR: dict[type, bool] = {}
_STORES = ("_parameters", "_buffers", "_modules")


def _plain(cls: type) -> bool:
    """Whether `cls`'s `__getattr__` is torch's (registered parameters, buffers, children) or ModelOpt's dynamic
    module's (its hparams and dynamic attributes, then torch's): the two `attribute` can answer without calling."""
    known = _PLAIN_GETATTR.get(cls)
    if known is None:
        getter = getattr(cls, "__getattr__", None)
        known = _PLAIN_GETATTR[cls] = getter is torch.nn.Module.__getattr__ or (
            getattr(getter, "__qualname__", "") == "DynamicModule.__getattr__"
        )
    return known


def attribute(obj: Any, name: str) -> Any:
    """`getattr(obj, name, None)`, the same answer, read from a module's own dictionaries where `getattr` would
    reach them through `__getattr__` (ModelOpt's dynamic modules pay a context manager per lookup there: ~100 us,
    seconds over the ~10^5 modules of a large MoE model). Anything else still goes through `getattr`."""
    own = getattr(obj, "__dict__", None)
    cls = type(obj)
    if own is None or name in own or hasattr(cls, name) or not _plain(cls):
        return getattr(obj, name, None)
    manager = own.get("_dm_attribute_manager")  # a dynamic module answers its hparams and dynamic attributes first
    if manager is not None and (name in manager.da_keys() or name in manager.hp_keys()):
        return getattr(obj, name, None)
    for store in _STORES:
        table = own.get(store)
        if table is None:  # a dynamic module that manages this store itself
            return getattr(obj, name, None)
        if name in table:
            return table[name]
    return None


def at_path(module: Any, path: str) -> Any:
    """The attribute at a dotted path under `module` (a declared leaf, core/registry.py), or None where it stops."""
    for name in path.split("."):
        module = attribute(module, name)
        if module is None:
            return None
    return module


def leaf_owner(module: Any, leaf: str) -> Any:
    """The module that holds a declared leaf's tensor (its linear)."""
    return at_path(module, leaf.rsplit(".", 1)[0])
