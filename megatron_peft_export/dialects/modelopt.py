"""NVIDIA ModelOpt PEFT: `<module>.lora_a_<name>.weight` [r, in], `<module>.lora_b_<name>.weight` [out, r].

The output is `base(x) + scale * B(A(x))`, so HF lora_alpha = scale * r. A module may hold several
named adapters; disabled ones do not act on the training model's output and are not exported.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .base import FoundTensor, owner_group, tp_split_dim

NAME = "modelopt"


def _adapters(module: torch.nn.Module) -> dict | None:
    adapters = getattr(module, "_lora_adapters", None)
    return adapters if isinstance(adapters, dict) else None


def adapter_names(module: torch.nn.Module) -> set[str]:
    return set(_adapters(module) or ())


def find(module: torch.nn.Module, adapter_name: str) -> Iterator[FoundTensor] | None:
    adapters = _adapters(module)
    if adapters is None:
        return None
    return _tensors(adapters.get(adapter_name))


def _tensors(adapter: dict | None) -> Iterator[FoundTensor]:
    if adapter is None or not adapter.get("enable", True):
        return
    alpha = adapter["scale"] * adapter["rank"]
    for role, key in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
        weight = adapter[key].weight
        yield FoundTensor(role, weight, alpha, tp_split_dim(weight), tp_group=owner_group(adapter[key]))
