"""The HF side of naming: read a base model's config.json and choose the architecture name map."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..core.archs import LLAMA, ArchMap, arch_for_model_type
from ..errors import ExportError
from .safe_read import JSON_LIMIT, read_json

log = logging.getLogger("megatron_peft_export")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ExportError(f"expected dtype one of {', '.join(_DTYPES)}, found {dtype!r}")
    return _DTYPES[dtype]


def read_hf_config(base_model_name_or_path: str | None) -> dict[str, Any] | None:
    """config.json of a local base model directory; None for a Hub id or no base (nothing is downloaded)."""
    if not base_model_name_or_path:
        return None
    path = Path(base_model_name_or_path) / "config.json"
    if not os.path.lexists(path):
        return None
    # the user names the base model directory; its files may be links elsewhere (shared model stores),
    # but must be regular files
    config = read_json(path, limit=JSON_LIMIT, error=ExportError, what="the base model's HF config.json")
    if not isinstance(config, dict):
        raise ExportError(
            f"{path}: expected a JSON object (the base model's HF config.json), found {type(config).__name__}"
        )
    return config


def choose_arch(model_type: str | None, hf_config: dict[str, Any] | None) -> ArchMap:
    """An explicit model_type wins, then the base model's config; with neither, the Llama-family names."""
    model_type = model_type or (hf_config or {}).get("model_type")
    if model_type is None:
        log.info(
            "no model_type and no local base config: using the Llama-family HF names (model.layers.{i}.self_attn/mlp)"
        )
        return LLAMA
    return arch_for_model_type(model_type)
