"""NVIDIA ModelOpt PEFT: `<module>.lora_a_<name>.weight` [r, in], `<module>.lora_b_<name>.weight` [out, r].

The output is `base(x) + scale * B(A(x))`, so HF lora_alpha = scale * r. A module may hold several
named adapters; disabled ones do not act on the training model's output and are not exported.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..core.registry import MODELOPT
from .base import FoundTensor, at_path, attribute, leaf_owner, owner_group, tp_split_dim

NAME = MODELOPT.family


def _adapters(module: torch.nn.Module) -> dict | None:
    adapters = attribute(module, "_lora_adapters")
    return adapters if isinstance(adapters, dict) else None


def adapter_names(module: torch.nn.Module) -> set[str]:
    return set(_adapters(module) or ())


def find(module: torch.nn.Module, adapter_name: str) -> Iterator[FoundTensor] | None:
    adapters = _adapters(module)
    if adapters is None:
        return None
    return _tensors(module, adapter_name, adapters.get(adapter_name))


def state(module: torch.nn.Module, adapter_name: str) -> tuple | None:
    """What `find` reads on `module` that can change without a module or parameter being registered: the adapter's
    entry (which dictionary, enabled, scale, rank, its A and B modules). Equal states, no registration since and the
    same tensor storage, shape and dtype mean `find` reports the same (the training hook's check between saves)."""
    adapters = _adapters(module)
    adapter = None if adapters is None else adapters.get(adapter_name)
    if adapter is None:
        return None
    return (
        id(adapter),
        adapter.get("enable", True),
        adapter["scale"],
        adapter["rank"],
        id(adapter["lora_a"]),
        id(adapter["lora_b"]),
    )


def _tensors(module: torch.nn.Module, adapter_name: str, adapter: dict | None) -> Iterator[FoundTensor]:
    """The declared tensors (`lora_a_<name>.weight`, `lora_b_<name>.weight`) of an enabled adapter."""
    if adapter is None or not adapter.get("enable", True):
        return
    alpha = adapter["scale"] * adapter["rank"]
    for decl, leaf, _ in MODELOPT.leaves(adapter_name):
        weight = at_path(module, leaf)
        yield FoundTensor(
            decl.role, weight, alpha, tp_split_dim(weight), tp_group=owner_group(leaf_owner(module, leaf))
        )
