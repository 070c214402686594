"""What quantization the base model was trained under (QLoRA-style LoRA over ModelOpt-quantized linears).

ModelOpt (`modelopt.torch.quantization.quantize`) gives each quantized linear a `weight_quantizer` and an
`input_quantizer` (TensorQuantizer modules); LoRA added afterwards wraps those linears and its own A and B
stay unquantized, so the adapter exports like any other. What the exporter records is how the base was
quantized, for the model card: read from the quantizers by duck typing, so modelopt need not be importable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .dialects.base import attribute


def _format(quantizer: torch.nn.Module) -> str:
    bits = getattr(quantizer, "num_bits", None)
    if isinstance(bits, (tuple, list)) and len(bits) == 2:
        e, m = bits
        name = f"fp{1 + e + m} (e{e}m{m})"
    else:
        name = f"int{bits}"
    blocks = getattr(quantizer, "block_sizes", None) or {}
    size = blocks.get(-1) or next((v for k, v in blocks.items() if isinstance(k, int)), None)
    if size:
        scale = blocks.get("scale_bits")
        scale_text = (
            f", fp{1 + scale[0] + scale[1]} (e{scale[0]}m{scale[1]}) scales"
            if isinstance(scale, (tuple, list)) and len(scale) == 2
            else ""
        )
        return f"{name} in blocks of {size}{scale_text}"
    return f"{name} per-channel" if getattr(quantizer, "axis", None) is not None else f"{name} per-tensor"


def _enabled(quantizer: torch.nn.Module | None) -> bool:
    return quantizer is not None and bool(getattr(quantizer, "is_enabled", False))


class Described:
    """One description per distinct scheme among the quantized linears of a walk (empty: not quantized), e.g.
    "ModelOpt fake quantization: weights int8 per-channel, activations int8 per-tensor". Called on every module of
    the export's one walk (`dialects.collect`'s `visit`, with its attribute reader); `found` after it."""

    def __init__(self) -> None:
        self.found: set[str] = set()

    def __call__(self, name: str, module: torch.nn.Module, read: Callable[[Any, str], Any] = attribute) -> None:
        weight = read(module, "weight_quantizer")
        if not isinstance(weight, torch.nn.Module) or not _enabled(weight) or ".lora_" in f".{name}":
            return
        inputs = read(module, "input_quantizer")
        text = f"ModelOpt fake quantization: weights {_format(weight)}"
        text += f", activations {_format(inputs)}" if _enabled(inputs) else ", activations unquantized"
        self.found.add(text)


def summary(descriptions: Iterable[set[str] | None]) -> str | None:
    """One line for the model card from every rank's descriptions (None: the base was not quantized)."""
    merged = sorted(set().union(*(d or set() for d in descriptions)))
    return "; ".join(merged) or None
