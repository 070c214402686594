"""Megatron-Bridge / NeMo LoRA, CanonicalLoRA and DoRA.

The base linear is wrapped: `<module>.to_wrap` is the base, `<module>.adapter` the adapter.
LoRA and DoRA: `adapter.linear_in` (A) and `adapter.linear_out` (B), scaled by alpha / dim; DoRA
adds `adapter.weight_magnitude`, one value per output row of the base, split like that output.
CanonicalLoRA: `adapter.adapter_{q,k,v,gate,up}`, each a LoRA for one HF module. Bridge has one
unnamed adapter per model, so `adapter_name` does not apply. The classes are matched by structure,
so megatron.bridge need not be importable here.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .base import FoundTensor, owner_group, tp_split_dim

NAME = "megatron-bridge"
CANONICAL_PARTS = ("q", "k", "v", "gate", "up")


def _wrapped_adapter(module: torch.nn.Module) -> torch.nn.Module | None:
    children = dict(module.named_children())
    return children["adapter"] if "to_wrap" in children and "adapter" in children else None


def adapter_names(module: torch.nn.Module) -> set[str]:
    return {"(unnamed Megatron-Bridge adapter)"} if _wrapped_adapter(module) is not None else set()


def find(module: torch.nn.Module, adapter_name: str) -> Iterator[FoundTensor] | None:
    adapter = _wrapped_adapter(module)
    if adapter is None:
        return None
    return _tensors(module.to_wrap, adapter)


def _lora(adapter: torch.nn.Module, part: str | None) -> Iterator[FoundTensor]:
    alpha = float(adapter.alpha)
    for role, linear in (("lora_A", adapter.linear_in), ("lora_B", adapter.linear_out)):
        yield FoundTensor(role, linear.weight, alpha, tp_split_dim(linear.weight), part, owner_group(linear))


def _tensors(base: torch.nn.Module, adapter: torch.nn.Module) -> Iterator[FoundTensor]:
    if hasattr(adapter, "linear_in"):
        yield from _lora(adapter, None)
        magnitude = getattr(adapter, "weight_magnitude", None)
        if magnitude is not None:  # split like the base output: rows for a column-parallel base, whole for row-parallel
            base_split = tp_split_dim(base.weight)
            yield FoundTensor("magnitude", magnitude, float(adapter.alpha), 0 if base_split == 0 else None, tp_group=owner_group(base))
        return
    children = dict(adapter.named_children())
    for part in CANONICAL_PARTS:
        sub = children.get(f"adapter_{part}")
        if sub is not None:
            yield from _lora(sub, part)
