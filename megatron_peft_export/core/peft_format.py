"""adapter_config.json and the README.md model card, from a plan. Pure functions returning text/dicts."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .plan import AdapterPlan


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def target_modules(plan: AdapterPlan) -> list[str]:
    """Short names for modules adapted in every layer, full paths for the rest: exactly the modules with tensors."""
    everywhere = {name for name, layers in plan.layer_modules.items() if layers == set(range(plan.num_layers)) or layers == {-1}}
    names = {m.rsplit(".", 1)[-1] if m.rsplit(".", 1)[-1] in everywhere else m for m in plan.modules}
    return sorted(names)


def adapter_config(plan: AdapterPlan, base_model_name_or_path: str | None) -> dict[str, Any]:
    """A complete LoraConfig dict: peft fills missing fields with defaults silently, so every field is written."""
    r, alpha = Counter((s.r, s.alpha) for s in plan.modules.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": target_modules(plan),
        "rank_pattern": {m: s.r for m, s in sorted(plan.modules.items()) if s.r != r},
        "alpha_pattern": {m: _number(s.alpha) for m, s in sorted(plan.modules.items()) if s.alpha != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": plan.use_dora,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def model_card(config: dict[str, Any], *, dialect: str, source: str, num_tensors: int) -> str:
    """README.md with the front matter the Hub reads (library_name: peft, base_model) and the LoRA settings."""
    base = config["base_model_name_or_path"]
    front = ["---", "library_name: peft"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front += ["tags:", "- lora", "- megatron", "- megatron-peft-export"]
    if config["use_dora"]:
        front.append("- dora")
    front.append("---")
    patterns = len(config["rank_pattern"]) + len(config["alpha_pattern"])
    body = [
        "",
        "# LoRA adapter exported from Megatron",
        "",
        f"Exported by megatron-peft-export from {source} ({dialect} adapters).",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| base model | {base or 'not recorded'} |",
        f"| r | {config['r']} |",
        f"| lora_alpha | {config['lora_alpha']} |",
        f"| target modules | {', '.join(config['target_modules'])} |",
        f"| per-module rank/alpha overrides | {patterns} |",
        f"| DoRA | {'yes' if config['use_dora'] else 'no'} |",
        f"| tensors | {num_tensors} |",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base or '<base model>')})",
        'model = PeftModel.from_pretrained(base, "<this directory>")',
        "```",
        "",
    ]
    return "\n".join(front + body)
