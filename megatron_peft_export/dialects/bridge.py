"""Megatron-Bridge / NeMo LoRA, CanonicalLoRA and DoRA.

The base linear is wrapped: `<module>.to_wrap` is the base, `<module>.adapter` the adapter.
LoRA and DoRA: `adapter.linear_in` (A) and `adapter.linear_out` (B), scaled by alpha / dim; DoRA
adds `adapter.weight_magnitude`, one value per output row of the base, split like that output.
CanonicalLoRA: `adapter.adapter_{q,k,v,gate,up}`, each a LoRA for one HF module. The tensor names are declared in
core/registry.py; this module matches them on live modules. On grouped experts
(a base with `num_gemms`, one GEMM per local expert) a 2-D A or B is shared by every local expert of the
rank and a 3-D one (`[local experts, ...]`) holds one matrix per expert; the three Bridge variants (shared,
per-expert, shared-outer) are mixes of the two. The router's LoRA (LoRATopKRouter) is a plain one. Bridge has one
unnamed adapter per model, so `adapter_name` does not apply. The classes are matched by structure,
so megatron.bridge need not be importable here. Where Bridge's forward is not what any HF adapter computes
(DoRA on row-parallel linears at TP > 1, DoRA over an in-output bias, LoRA on row-parallel linears whose
caller reduces their partial sums, router LoRA under sequence parallelism), the module is refused (`_refusal`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..core.registry import BRIDGE_DORA, BRIDGE_LORA, DIALECTS, Dialect
from ..errors import DialectError
from .base import FoundTensor, Refusal, at_path, leaf_owner, owner_group, tp_split_dim

NAME = BRIDGE_LORA.family
_VARIANTS = tuple(d for d in DIALECTS if d.family == NAME)


def _wrapped_adapter(module: torch.nn.Module) -> torch.nn.Module | None:
    children = (
        module._modules
    )  # the registered children, as named_children yields them (without building a dict per module)
    adapter = children.get("adapter")
    return adapter if adapter is not None and children.get("to_wrap") is not None else None


def adapter_names(module: torch.nn.Module) -> set[str]:
    return {"(unnamed Megatron-Bridge adapter)"} if _wrapped_adapter(module) is not None else set()


def find(module: torch.nn.Module, adapter_name: str, read: Any = None) -> Iterator[FoundTensor | Refusal] | None:
    """`read` (the walk's attribute reader) is not needed: the wrapper's children are read from `_modules`."""
    adapter = _wrapped_adapter(module)
    if adapter is None:
        return None
    return _tensors(module, adapter)


def _variant(wrapper: torch.nn.Module) -> tuple[Dialect | None, list[str | None]]:
    """The first Bridge variant (core/registry.py) whose declared tensors the wrapper holds, and the (sub-)adapters
    it holds them for."""
    for dialect in _VARIANTS:
        leaves = dialect.leaves()
        parts = [
            part
            for part in dialect.parts or (None,)
            if all(at_path(wrapper, leaf) is not None for _, leaf, p in leaves if p == part)
        ]
        if parts:
            return dialect, parts
    return None, []


def _lora(wrapper: torch.nn.Module, dialect: Dialect, part: str | None, expert: int | None = None):
    """The declared A and B of one (sub-)adapter; of one local expert `expert` on grouped experts, where a 2-D side
    is the one all experts share and a 3-D side is sliced (its TP axis moves down by one)."""
    alpha = float(at_path(wrapper, dialect.alpha.replace("{part}", part or "")))
    for decl, leaf, p in dialect.leaves():
        if p != part or decl.role == "magnitude":
            continue
        weight = at_path(wrapper, leaf)
        split = tp_split_dim(weight)
        if expert is not None and weight.dim() == 3:
            weight, split = weight[expert], None if split is None else split - 1
        yield FoundTensor(decl.role, weight, alpha, split, part, owner_group(leaf_owner(wrapper, leaf)), expert)


DORA_ROW_PARALLEL = (
    "found Megatron-Bridge DoRA on row-parallel linears at tensor-parallel size {size}: {modules}. Bridge's "
    "DoRALinear divides each "
    "output row by the norm of this TP rank's own input columns of the weight, never reduced over tensor "
    "parallelism, so the ranks "
    "scale the same row differently and no peft DoRA adapter (one norm per row) computes what the model computes; "
    "expected DoRA "
    "only on column-parallel linears (linear_qkv, linear_fc1) when tensor_model_parallel_size > 1, or "
    "tensor_model_parallel_size=1, or LoRA"
)
DORA_BIAS = (
    "found Megatron-Bridge DoRA on linears that add their bias inside their output: {modules}. Bridge's DoRALinear "
    "scales that "
    "bias by magnitude / weight norm, peft's DoRA adds it unscaled, so no peft DoRA adapter computes what the "
    "model computes; "
    "expected DoRA on linears without a bias or that return it (skip_bias_add), or LoRA"
)
PARTIAL_OUTPUT = (
    "found Megatron-Bridge LoRA on row-parallel linears that return partial sums for their caller to reduce "
    "(expert linear_fc2 with "
    "explicit expert communication) at tensor-parallel size {size}: {modules}. Bridge gathers LoRA-B's output rows "
    "without "
    "reducing LoRA-A's partial output, so the model computes {size} x a block-diagonal update, which no LoRA "
    "reproduces; expected "
    "expert_tensor_parallel_size=1 for LoRA on expert linear_fc2 (or LoRA on expert linear_fc1 only)"
)
_ROUTER_SEQUENCE_PARALLEL = (
    "found Megatron-Bridge LoRA on the MoE router at tensor-parallel size {size} with sequence parallelism: "
    "{modules}. Bridge "
    "all-gathers the router LoRA's outputs over TP ranks that hold different tokens, so each token's router logits "
    "mix other "
    "tokens' and no HF adapter reproduces them; expected router LoRA at tensor_model_parallel_size=1 or without "
    "sequence parallelism"
)


def _tp_size(*owners: torch.nn.Module | None) -> int:
    """Size of the tensor-parallel group megatron recorded on the first of `owners` that has one (TE grouped linears:
    `_tp_group`)."""
    for owner in owners:
        for attribute in ("tp_group", "_tp_group"):
            group = getattr(owner, attribute, None)
            if group is not None:
                return group.size()
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _bias_in_output(base: torch.nn.Module) -> bool:
    """The base adds a bias inside the output it returns (megatron: skip_bias_add=False, e.g. linear_qkv with
    add_qkv_bias)."""
    bias = getattr(base, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.numel() == 0:
        return False
    returned = getattr(base, "te_return_bias", None)
    return not (getattr(base, "skip_bias_add", False) if returned is None else returned)


def _reduced_by_caller(base: torch.nn.Module) -> bool:
    """A row-parallel base returning its partial sum for the caller to reduce (megatron's explicit expert communication;
    TE without a parallel mode)."""
    return bool(getattr(base, "explicit_expert_comm", False)) or (
        "parallel_mode" in vars(base) and base.parallel_mode is None
    )


def _refusal(base: torch.nn.Module, adapter: torch.nn.Module) -> Refusal | None:
    """Layouts whose Bridge forward is not what any HF adapter computes (README, "Megatron-Bridge"), or None.

    Decided from the math and megatron's own module facts, which every Bridge version shares: `input_is_parallel` is
    Bridge's record of a row-parallel base (the branch its DoRA norm takes), and the TP size is the base's group.
    """
    row = bool(getattr(adapter, "input_is_parallel", False))
    size = _tp_size(base, getattr(adapter, "linear_in", None))
    if getattr(adapter, "weight_magnitude", None) is not None:
        if row and size > 1:
            return Refusal(DORA_ROW_PARALLEL.replace("{size}", str(size)))
        if _bias_in_output(base):
            return Refusal(DORA_BIAS)
    if row and size > 1 and _reduced_by_caller(base):
        return Refusal(PARTIAL_OUTPUT.replace("{size}", str(size)))
    if hasattr(base, "routing") and size > 1 and getattr(getattr(base, "config", None), "sequence_parallel", False):
        return Refusal(_ROUTER_SEQUENCE_PARALLEL.replace("{size}", str(size)))
    return None


def _tensors(wrapper: torch.nn.Module, adapter: torch.nn.Module) -> Iterator[FoundTensor | Refusal]:
    base = wrapper.to_wrap
    refusal = _refusal(base, adapter)
    if refusal is not None:
        yield refusal
        return
    dialect, parts = _variant(wrapper)
    experts = getattr(base, "num_gemms", None)
    if experts is not None and dialect in (BRIDGE_LORA, BRIDGE_DORA):
        if dialect is BRIDGE_DORA:
            raise DialectError(
                "found Megatron-Bridge DoRA on grouped experts; expected LoRA there (DoRA is exported for dense "
                "linears and SequentialMLP experts)"
            )
        for e in range(experts):
            yield from _lora(wrapper, dialect, None, e)
        return
    for part in parts:
        yield from _lora(wrapper, dialect, part)
    if dialect is BRIDGE_DORA:  # the magnitude splits like the base output: rows if column-parallel, else whole
        base_split = tp_split_dim(base.weight)
        magnitude = at_path(wrapper, next(leaf for decl, leaf, _ in dialect.leaves() if decl.role == "magnitude"))
        yield FoundTensor(
            "magnitude", magnitude, float(adapter.alpha), 0 if base_split == 0 else None, tp_group=owner_group(base)
        )
