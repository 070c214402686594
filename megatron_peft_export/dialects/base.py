"""What a dialect reports for one module: its adapter tensors, their role and tensor-parallel split."""

from __future__ import annotations

from collections.abc import Callable
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
    return Reader()(obj, name)


class Reader:
    """`attribute` for the modules of one walk, the same answers with the repeated questions asked once: whether a
    class answers a name itself (`hasattr(cls, name)`, or a `__getattr__` `attribute` does not read through) once per
    class and name, a ModelOpt dynamic module's hparam and dynamic-attribute names once per module (building them is
    most of a lookup on such a module). Made for one walk, dropped after it: nothing it caches outlives the walk."""

    __slots__ = ("_on_class", "_dynamic")

    def __init__(self) -> None:
        self._on_class: dict[tuple[type, str], bool] = {}
        self._dynamic: dict[int, tuple[Any, set[str]]] = {}
        """id(module) -> (module, its dynamic names): the module is held so its id stays its own."""

    def __call__(self, obj: Any, name: str) -> Any:
        own = getattr(obj, "__dict__", None)
        if own is None or name in own:
            return getattr(obj, name, None)
        cls = type(obj)
        on_class = self._on_class.get((cls, name))
        if on_class is None:
            on_class = self._on_class[cls, name] = hasattr(cls, name) or not _plain(cls)
        if on_class:
            return getattr(obj, name, None)
        manager = own.get("_dm_attribute_manager")
        if manager is not None and name in self._dynamic_names(obj, manager):
            return getattr(obj, name, None)
        for store in _STORES:
            table = own.get(store)
            if table is None:
                return getattr(obj, name, None)
            if name in table:
                return table[name]
        return None

    def _dynamic_names(self, module: Any, manager: Any) -> set[str]:
        held = self._dynamic.get(id(module))
        if held is None:
            held = self._dynamic[id(module)] = (module, manager.da_keys() | manager.hp_keys())
        return held[1]


def at_path(module: Any, path: str, read: Callable[[Any, str], Any] = attribute) -> Any:
    """The attribute at a dotted path under `module` (a declared leaf, core/registry.py), or None where it stops;
    `read` is `attribute` or a walk's `Reader`."""
    for name in path.split("."):
        module = read(module, name)
        if module is None:
            return None
    return module


def leaf_owner(module: Any, leaf: str, read: Callable[[Any, str], Any] = attribute) -> Any:
    """The module that holds a declared leaf's tensor (its linear)."""
    return at_path(module, leaf.rsplit(".", 1)[0], read)
