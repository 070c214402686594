"""Megatron-Bridge / NeMo LoRA, CanonicalLoRA and DoRA.

The base linear is wrapped: `<module>.to_wrap` is the base, `<module>.adapter` the adapter.
LoRA and DoRA: `adapter.linear_in` (A) and `adapter.linear_out` (B), scaled by alpha / dim; DoRA
adds `adapter.weight_magnitude`, one value per output row of the base, split like that output.
CanonicalLoRA: `adapter.adapter_{q,k,v,gate,up}`, each a LoRA for one HF module. On grouped experts
(a base with `num_gemms`, one GEMM per local expert) a 2-D A or B is shared by every local expert of the
rank and a 3-D one (`[local experts, ...]`) holds one matrix per expert; the three Bridge variants (shared,
per-expert, shared-outer) are mixes of the two. The router's LoRA (LoRATopKRouter) is a plain one. Bridge has one
unnamed adapter per model, so `adapter_name` does not apply. The classes are matched by structure,
so megatron.bridge need not be importable here.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import DialectError
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


def _grouped_lora(adapter: torch.nn.Module, experts: int) -> Iterator[FoundTensor]:
    """Per local expert: a 2-D side is the one all experts share, a 3-D side is sliced (its TP axis moves down by one)."""
    if getattr(adapter, "weight_magnitude", None) is not None:
        raise DialectError("found Megatron-Bridge DoRA on grouped experts; expected LoRA there (DoRA is exported for dense linears and SequentialMLP experts)")
    alpha = float(adapter.alpha)
    for e in range(experts):
        for role, linear in (("lora_A", adapter.linear_in), ("lora_B", adapter.linear_out)):
            weight, split = linear.weight, tp_split_dim(linear.weight)
            if weight.dim() == 3:
                weight, split = weight[e], None if split is None else split - 1
            yield FoundTensor(role, weight, alpha, split, tp_group=owner_group(linear), expert=e)


def _check_computes_lora(base: torch.nn.Module, adapter: torch.nn.Module) -> None:
    """Refuse two Bridge layouts whose adapter is not B·A of each token (BRIDGE_FACTS.md section 7), rather than export another function.

    Expert fc2 at expert TP > 1: the base returns partial sums that the token dispatcher adds up, but the adapter
    gathers B's output rows without reducing A's partial output, giving ETP x a block-diagonal update. The router
    at TP > 1 with sequence parallelism: A's and B's outputs are all-gathered over TP ranks that hold different tokens.
    """
    group = getattr(adapter, "tp_group", None) or getattr(adapter, "expert_tp_group", None)
    if group is None or group.size() == 1:
        return
    if getattr(adapter, "is_expert", False) and getattr(adapter, "input_is_parallel", False):
        raise DialectError(
            f"found Megatron-Bridge LoRA on a row-parallel expert linear (linear_fc2) at expert tensor-parallel size {group.size()}: "
            "Bridge gathers LoRA-B's output rows without reducing LoRA-A's partial output, so the model computes "
            f"{group.size()} x a block-diagonal update, which no LoRA of this rank reproduces; expected expert_tensor_parallel_size=1 "
            "for LoRA on expert linear_fc2 (or LoRA on expert linear_fc1 only)"
        )
    if hasattr(base, "routing") and getattr(getattr(adapter, "config", None), "sequence_parallel", False):
        raise DialectError(
            f"found Megatron-Bridge LoRA on the MoE router at tensor-parallel size {group.size()} with sequence parallelism: Bridge "
            "all-gathers the router LoRA's outputs over TP ranks that hold different tokens, so each token's router logits mix "
            "other tokens' and no HF adapter reproduces them; expected router LoRA at tensor_model_parallel_size=1 or without sequence parallelism"
        )


def _tensors(base: torch.nn.Module, adapter: torch.nn.Module) -> Iterator[FoundTensor]:
    _check_computes_lora(base, adapter)
    experts = getattr(base, "num_gemms", None)
    if experts is not None and hasattr(adapter, "linear_in"):
        yield from _grouped_lora(adapter, experts)
        return
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
