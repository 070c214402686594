"""The names of an HF PEFT adapter directory: its files and its tensor keys. Spelled here and nowhere else.

Pure, so the planner can build keys without importing file I/O; `io/peft_dir.py` reads, checks and writes the
directory with them.
"""

from __future__ import annotations

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
"""peft's older weights file (a torch.save of the state dict)."""
MODEL_CARD = "README.md"
PEFT_PREFIX = "base_model.model."
"""Every tensor key starts with it: peft's PeftModel.base_model (the LoRA model) .model (the HF model)."""
FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD)
"""The files an exported adapter directory holds."""
MAX_CARD_BYTES = 1 << 20


def hf_key(module: str, role: str) -> str:
    """The tensor key of one HF module's `lora_A`, `lora_B` or DoRA `magnitude`."""
    suffix = "lora_magnitude_vector" if role == "magnitude" else f"{role}.weight"
    return f"{PEFT_PREFIX}{module}.{suffix}"
