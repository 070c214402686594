"""Megatron-Bridge / NeMo LoRA, CanonicalLoRA and DoRA (filled in from the Bridge source facts)."""

from __future__ import annotations

from typing import Iterator

import torch

NAME = "megatron-bridge"


def adapter_names(module: torch.nn.Module) -> set[str]:
    return set()


def find(module: torch.nn.Module, adapter_name: str) -> Iterator | None:
    return None
