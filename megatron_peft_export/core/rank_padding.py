"""Pad every LoRA module to one rank without changing what the adapter computes.

lora_A ([r, in]) gets zero rows and lora_B ([out, r]) zero columns, so B @ A is unchanged; lora_alpha
becomes alpha * R / r so peft's scaling alpha / r stays the same (rsLoRA is never written, so the
scaling is always alpha / r). A DoRA magnitude is untouched: DoRA normalizes W + scaling * B @ A,
which padding does not change either.

Why: one rank for every module and every checkpoint of a run lets `peft.utils.hotswap` swap adapters
into a compiled model without recompiling, drops `rank_pattern` (which vLLM ignores), and rounds an
unusual rank up to a size servers allocate (vLLM's --max-lora-rank takes 8, 16, 32, 64, ...).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ShapeMismatchError
from .plan import AdapterPlan, LoraSettings, hf_key


def pad_ranks(plan: AdapterPlan, tensors: dict[str, torch.Tensor], rank: int) -> tuple[AdapterPlan, dict[str, torch.Tensor]]:
    """The plan and tensors with every module at rank `rank` (>= each module's rank), alpha scaled to keep alpha / r."""
    if rank < 1:
        raise ShapeMismatchError(f"pad_rank_to: expected a rank >= 1, found {rank}")
    too_big = sorted(m for m, s in plan.modules.items() if s.r > rank)
    if too_big:
        largest = max(plan.modules[m].r for m in too_big)
        raise ShapeMismatchError(
            f"pad_rank_to={rank} is below the rank of {len(too_big)} module(s) (up to {largest}, e.g. {too_big[0]}); "
            f"padding never truncates, pass pad_rank_to >= {largest}"
        )
    shapes, padded, modules = dict(plan.shapes), dict(tensors), {}
    for module, settings in plan.modules.items():
        a_key, b_key = hf_key(module, "lora_A"), hf_key(module, "lora_B")
        a, b = tensors[a_key], tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != settings.r or b.shape[1] != settings.r:
            raise ShapeMismatchError(
                f"pad_rank_to: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected 2-D [r, in] and [out, r] "
                f"with r = {settings.r}. Export without pad_rank_to"
            )
        modules[module] = LoraSettings(rank, settings.alpha * rank / settings.r)
        if settings.r == rank:
            continue
        padded[a_key] = torch.cat([a, a.new_zeros(rank - settings.r, a.shape[1])], dim=0)
        padded[b_key] = torch.cat([b, b.new_zeros(b.shape[0], rank - settings.r)], dim=1)
        shapes[a_key], shapes[b_key] = tuple(padded[a_key].shape), tuple(padded[b_key].shape)
    return dataclasses.replace(plan, shapes=shapes, modules=modules), padded
