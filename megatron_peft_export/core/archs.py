"""Architecture name maps: which HF modules a Megatron module becomes, per model family.

Declared tables only; the planner decides shapes and slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UnsupportedModelError

Layout = Literal["plain", "qkv", "gate_up"]
"""How a fused output dimension is laid out on a TP rank: one module, query groups, or [gate_t; up_t]."""


@dataclass(frozen=True)
class ModuleMap:
    """One Megatron linear inside a transformer layer and the HF modules it becomes."""

    megatron: str
    """Path inside the layer, e.g. `self_attention.linear_qkv`."""
    hf: tuple[str, ...]
    """HF paths inside the layer, in the order the fused Megatron output holds them."""
    layout: Layout
    parts: tuple[str, ...] = ()
    """CanonicalLoRA's names for the sub-adapters, in the order of `hf`."""


@dataclass(frozen=True)
class ArchMap:
    """Megatron -> HF module names for one family of decoder-only models."""

    name: str
    model_types: tuple[str, ...]
    modules: tuple[ModuleMap, ...]
    layer_prefix: str = "model.layers.{i}"
    output_layer: str = "lm_head"


_QKV = ModuleMap("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv", ("q", "k", "v"))
_PROJ = ModuleMap("self_attention.linear_proj", ("self_attn.o_proj",), "plain")
_FC2 = ModuleMap("mlp.linear_fc2", ("mlp.down_proj",), "plain")

LLAMA = ArchMap(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    modules=(_QKV, _PROJ, ModuleMap("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), "gate_up", ("gate", "up")), _FC2),
)
"""Llama-family decoders; linear_fc1 is gated (SwiGLU)."""

NEMOTRON = ArchMap(
    name="nemotron",
    model_types=("nemotron",),
    modules=(_QKV, _PROJ, ModuleMap("mlp.linear_fc1", ("mlp.up_proj",), "plain"), _FC2),
)
"""Nemotron decoders: the same attention names, a non-gated MLP (up_proj, down_proj)."""

ARCHS: tuple[ArchMap, ...] = (LLAMA, NEMOTRON)


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHS for t in arch.model_types)


def arch_for_model_type(model_type: str) -> ArchMap:
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(
        f"expected an HF model_type with a name map ({', '.join(supported_model_types())}), "
        f"found {model_type!r}. Pass model_type= for a supported family with the same module names, "
        "or open an issue for this family."
    )
