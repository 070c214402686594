"""Pad every LoRA module to one rank and one scale without changing what the adapter computes.

lora_A ([r, in]) gets zero rows and lora_B ([out, r]) zero columns, so B @ A is unchanged. Modules whose scale
alpha / r differs from the adapter's most common scale s get it folded into lora_B (B * (alpha / r) / s, computed
in float64), and every module gets lora_alpha = s * R: peft's scaling is then s everywhere and each module's
scale * B @ A is what it was (up to one rounding of B in its dtype). rsLoRA is never written, so the scaling is
always alpha / r. A DoRA magnitude is untouched: DoRA normalizes W + scale * B @ A, which neither step changes.

Why: one rank and one scale for every module (no rank_pattern, no alpha_pattern) is what every server reads the
same way: vLLM before 0.32 applies the one lora_alpha / r to every module; `peft.utils.hotswap` swaps adapters of
one shape into a compiled model without recompiling; and an unusual rank rounds up to a size servers allocate
(vLLM's --max-lora-rank takes 8, 16, 32, 64, ...).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from ..errors import ShapeMismatchError
from .peft_names import hf_key
from .plan import AdapterPlan, LoraSettings


def pad_ranks(
    plan: AdapterPlan, tensors: dict[str, torch.Tensor], rank: int
) -> tuple[AdapterPlan, dict[str, torch.Tensor]]:
    """The plan and tensors with every module at rank `rank` (>= each module's rank) and one scale, the same deltas."""
    if rank < 1:
        raise ShapeMismatchError(f"pad_rank_to: expected a rank >= 1, found {rank}")
    too_big = sorted(m for m, s in plan.modules.items() if s.r > rank)
    if too_big:
        largest = max(plan.modules[m].r for m in too_big)
        raise ShapeMismatchError(
            f"pad_rank_to={rank} is below the rank of {len(too_big)} module(s) (up to {largest}, e.g. {too_big[0]}); "
            f"padding never truncates, pass pad_rank_to >= {largest}"
        )
    scale = Counter(s.alpha / s.r for s in plan.modules.values()).most_common(1)[0][
        0
    ]  # those modules keep their B bit for bit
    shapes, padded, modules = dict(plan.shapes), dict(tensors), {}
    for module, settings in plan.modules.items():
        a_key, b_key = hf_key(module, "lora_A"), hf_key(module, "lora_B")
        a, b = tensors[a_key], tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != settings.r or b.shape[1] != settings.r:
            raise ShapeMismatchError(
                f"pad_rank_to: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected 2-D [r, "
                f"in] and [out, r] "
                f"with r = {settings.r}. Export without pad_rank_to"
            )
        modules[module] = LoraSettings(rank, scale * rank)
        factor = settings.alpha / settings.r / scale
        if factor != 1.0:
            b = (b.double() * factor).to(b.dtype)
        if settings.r != rank:
            a = torch.cat([a, a.new_zeros(rank - settings.r, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - settings.r)], dim=1)
        padded[a_key], padded[b_key] = a, b
        shapes[a_key], shapes[b_key] = tuple(a.shape), tuple(b.shape)
    return dataclasses.replace(plan, shapes=shapes, modules=modules), padded
