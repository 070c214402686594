"""NVIDIA ModelOpt PEFT: `<module>.lora_a_<name>.weight` [r, in], `<module>.lora_b_<name>.weight` [out, r].

The output is `base(x) + scale * B(A(x))`, so HF lora_alpha = scale * r. A module may hold several
named adapters; disabled ones do not act on the training model's output and are not exported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..core.registry import MODELOPT
from .base import _STORES, FoundTensor, Refusal, at_path, attribute, tp_split_dim

NAME = MODELOPT.family


Read = Callable[[Any, str], Any]


def _adapters(module: torch.nn.Module, read: Read = attribute) -> dict | None:
    adapters = read(module, "_lora_adapters")
    return adapters if isinstance(adapters, dict) else None


def adapter_names(module: torch.nn.Module) -> set[str]:
    return set(_adapters(module) or ())


def find(module: torch.nn.Module, adapter_name: str, read: Read = attribute) -> Iterator[FoundTensor | Refusal] | None:
    """`read`: `dialects.base.attribute`, or the walk's `Reader` (the same answers)."""
    adapters = _adapters(module, read)
    if adapters is None:
        return None
    return _tensors(module, adapter_name, adapters.get(adapter_name), read)


_ENTRY = {"lora_A": "lora_a", "lora_B": "lora_b"}
"""The adapter entry's field holding the module ModelOpt's forward computes with, per role: the registered child
`lora_a_<name>`/`lora_b_<name>` the export reads must be that module."""

_PLAIN = (bool, int, float, str, type(None))
"""Values a probe compares with `==` (their type first): nothing whose `==` is elementwise."""


def probes(module: torch.nn.Module, adapter_name: str) -> list[tuple[dict, str, Any, bool]] | None:
    """What `find` reads on `module` that can change without a module or parameter being registered (the adapter's
    entry: which dictionary, enabled, scale, rank, its A and B modules; each tensor, its tensor-parallel marks, its
    owner's TP group), as dictionary lookups the check repeats at C speed: (dictionary, key, value found, compared
    by identity (else by type and ==)), each dictionary pinned by a probe of the one that holds it; None when a read
    is not such a lookup (then what `find` reports is compared, host_snapshot._adapter_state). A child, parameter or
    attribute set in a module's stores or dictionary directly changes a probed entry; what a class defines (a
    ModelOpt dynamic attribute, a class-level `tp_group`) is code and is taken as the walk found it."""
    found: list[tuple[dict, str, Any, bool]] = []
    own = module.__dict__
    adapters = own.get("_lora_adapters")
    if type(adapters) is not dict:
        return None
    adapter = adapters.get(adapter_name)
    found += [(own, "_lora_adapters", adapters, True), (adapters, adapter_name, adapter, True)]
    if adapter is None:
        return found
    if type(adapter) is not dict:
        return None
    for field in ("enable", "scale", "rank"):
        value = adapter.get(field)
        if type(value) not in _PLAIN:
            return None
        found.append((adapter, field, value, False))
    found += [(adapter, "lora_a", adapter.get("lora_a"), True), (adapter, "lora_b", adapter.get("lora_b"), True)]
    if not adapter.get("enable", True):
        return found
    for _, path, last in _leaves(adapter_name):
        owner = module
        for name in (*path, last):
            owner = _probed(owner, name, found)
            if owner is None:
                return None
        weight_dict = getattr(owner, "__dict__", None)
        if type(weight_dict) is not dict:
            return None
        for field in ("tensor_model_parallel", "partition_dim"):
            value = weight_dict.get(field)
            if type(value) not in _PLAIN:
                return None
            found.append((weight_dict, field, value, False))
    for _, path, _ in _leaves(adapter_name):
        owner = module
        for name in path:
            owner = _probed(owner, name, found)
        _probed(owner, "tp_group", found)  # where it is registered or set; absent there: the class's (code)
    return found


def _probed(obj: Any, name: str, found: list) -> Any:
    """`obj.name` when a module's own dictionary or stores hold it, with the probes that pin that answer
    (absent from the dictionary and the stores before the one holding it; that store's entry); None when none does."""
    own = getattr(obj, "__dict__", None)
    if type(own) is not dict:
        return None
    found.append((own, name, own.get(name), True))
    if name in own:
        return own[name]
    for store in _STORES:
        table = own.get(store)
        found.append((own, store, table, True))
        if type(table) is dict:
            found.append((table, name, table.get(name), True))
            if name in table:
                return table[name]
    return None


@functools.lru_cache(maxsize=64)
def _leaves(adapter_name: str) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """(role, path to the owner, the tensor's name on it) of each declared tensor of the adapter named
    `adapter_name`."""
    leaves = ((decl.role, leaf.rpartition(".")) for decl, leaf, _ in MODELOPT.leaves(adapter_name))
    return tuple((role, tuple(path.split(".")), last) for role, (path, _, last) in leaves)


def _tensors(
    module: torch.nn.Module, adapter_name: str, adapter: dict | None, read: Read
) -> Iterator[FoundTensor | Refusal]:
    """The declared tensors (`lora_a_<name>.weight`, `lora_b_<name>.weight`) of an enabled adapter. Each leaf's
    owner (its linear) is read once: the tensor is its last component, the TP group the owner's (`owner_group`).
    An enabled adapter missing one of them (a child deleted) is refused, naming it."""
    if adapter is None or not adapter.get("enable", True):
        return
    alpha = adapter["scale"] * adapter["rank"]
    for role, path, last in _leaves(adapter_name):
        leaf = ".".join(path)
        owner = at_path(module, leaf, read)
        weight = None if owner is None else read(owner, last)
        if not isinstance(weight, torch.Tensor):
            yield Refusal(
                f"ModelOpt LoRA adapter {adapter_name!r} is enabled on {{modules}} but its {leaf}.{last} is missing "
                "(deleted, or never made): expected a tensor there; disable the adapter or add it again"
            )
            return
        used = adapter.get(_ENTRY[role])
        if used is not None and used is not owner:
            yield Refusal(
                f"ModelOpt LoRA adapter {adapter_name!r} on {{modules}} computes with a {_ENTRY[role]} module other "
                f"than its registered {leaf} (one was replaced without the other): the export would write weights "
                "the model does not use; replace both, or add the adapter again"
            )
            return
        yield FoundTensor(role, weight, alpha, tp_split_dim(weight), tp_group=read(owner, "tp_group"))
