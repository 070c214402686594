"""NVIDIA ModelOpt PEFT: `<module>.lora_a_<name>.weight` [r, in], `<module>.lora_b_<name>.weight` [out, r].

The output is `base(x) + scale * B(A(x))`, so HF lora_alpha = scale * r. A module may hold several
named adapters; disabled ones do not act on the training model's output and are not exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..core.registry import MODELOPT
from .base import FoundTensor, at_path, attribute, tp_split_dim

NAME = MODELOPT.family


Read = Callable[[Any, str], Any]


def _adapters(module: torch.nn.Module, read: Read = attribute) -> dict | None:
    adapters = read(module, "_lora_adapters")
    return adapters if isinstance(adapters, dict) else None


def adapter_names(module: torch.nn.Module) -> set[str]:
    return set(_adapters(module) or ())


def find(module: torch.nn.Module, adapter_name: str, read: Read = attribute) -> Iterator[FoundTensor] | None:
    """`read`: `dialects.base.attribute`, or the walk's `Reader` (the same answers)."""
    adapters = _adapters(module, read)
    if adapters is None:
        return None
    return _tensors(module, adapter_name, adapters.get(adapter_name), read)


def state(module: torch.nn.Module, adapter_name: str, read: Read = attribute) -> tuple | None:
    """What `find` reads on `module` that can change without a module or parameter being registered: the adapter's
    entry (which dictionary, enabled, scale, rank, its A and B modules) and what `find` reports for each of its
    tensors (which tensor, its split and TP group: a child or parameter set in `_modules`/`_parameters` directly, or
    a changed `tensor_model_parallel`, registers nothing). Equal states, no registration since and the same tensor
    storage, shape and dtype mean `find` reports the same (the training hook's check between saves). `read`: as
    `find`'s (one `Reader` for all carriers of one check)."""
    own = module.__dict__  # where `attribute` finds it (its answer without making a reader per module)
    adapters = own["_lora_adapters"] if "_lora_adapters" in own else _adapters(module)
    adapter = adapters.get(adapter_name) if isinstance(adapters, dict) else None
    if adapter is None:
        return None
    found = tuple(
        (t.role, t.alpha, t.split_dim, id(t.tp_group), id(t.tensor))
        for t in _tensors(module, adapter_name, adapter, read)
    )
    entry = (id(adapter), adapter.get("enable", True), adapter["scale"], adapter["rank"])
    return (*entry, id(adapter.get("lora_a")), id(adapter.get("lora_b")), found)


def _tensors(module: torch.nn.Module, adapter_name: str, adapter: dict | None, read: Read) -> Iterator[FoundTensor]:
    """The declared tensors (`lora_a_<name>.weight`, `lora_b_<name>.weight`) of an enabled adapter. Each leaf's
    owner (its linear) is read once: the tensor is its last component, the TP group the owner's (`owner_group`)."""
    if adapter is None or not adapter.get("enable", True):
        return
    alpha = adapter["scale"] * adapter["rank"]
    for decl, leaf, _ in MODELOPT.leaves(adapter_name):
        path, _, last = leaf.rpartition(".")
        owner = at_path(module, path, read)
        weight = None if owner is None else read(owner, last)
        yield FoundTensor(decl.role, weight, alpha, tp_split_dim(weight), tp_group=read(owner, "tp_group"))
