"""adapter_config.json and the README.md model card, from a plan. Pure functions returning text/dicts."""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from itertools import repeat
from operator import itemgetter
from typing import Any

import yaml

from ..errors import DialectError, ShapeMismatchError
from .plan import AdapterPlan

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TAGS = ("lora", "megatron", "megatron-peft-export")
_TAG = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")
"""A dialect tag read back from a card (a card is anyone's text: a tag with a newline would add front matter)."""
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
"""A module's layer index (compiled once: target_modules reads it once per run of modules of a layer)."""
_CELL_UNSAFE = str.maketrans({"|": "\\|", "<": "&lt;", ">": "&gt;", "`": "\\`"})


def _cell(value: Any) -> str:
    """Text from a config or an old card as one markdown table cell: one line (control characters as spaces), `|`
    escaped, no HTML, at most 200 characters."""
    text = "".join(c if c.isprintable() else " " for c in str(value)[:200])
    return text.translate(_CELL_UNSAFE)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def target_modules(plan: AdapterPlan, skip: frozenset[str] = frozenset()) -> list[str]:
    """Short names for modules adapted in every layer that has them, full paths for the rest (without a prefix that
    transformers renames on load, which peft matches as a suffix): exactly the modules with tensors."""
    modules = sorted(m for m in plan.modules if m not in skip) if skip else sorted(plan.modules)
    layers: dict[str, set[int]] = defaultdict(set)
    for layer, run in _layer_runs(modules):
        for short in set(map(itemgetter(2), map(str.rpartition, run, repeat(".")))):
            layers[short].add(layer)
    every = set(range(plan.num_layers))
    everywhere = {name for name, found in layers.items() if found == plan.layers_of.get(name, every) or found == {-1}}
    if everywhere.issuperset(layers):
        return sorted(layers)
    renamed = plan.renamed_prefix
    shorts = map(itemgetter(2), map(str.rpartition, modules, repeat(".")))
    return sorted(
        {
            short if short in everywhere else module.removeprefix(renamed) if renamed else module
            for short, module in zip(shorts, modules)
        }
    )


def _layer_runs(modules: list[str]) -> Iterator[tuple[int, list[str]]]:
    """Sorted modules as runs of one layer index (the first `layers.<i>.` in the name; -1 without one), each found by
    one search and a bisection: the modules after one with that index's text up to its end, `<head>layers.<i>.`, are
    the run of every module starting with that text (sorted: up to `<head>layers.<i>/`), and each of those has the
    same first match (`layers.` cannot overlap itself, so no earlier match starts inside the text). 10^5 expert
    modules are a few dozen runs."""
    at = 0
    while at < len(modules):
        match = _LAYER_INDEX.search(modules[at])
        if match is None:
            end, layer = at + 1, -1
        else:
            end, layer = bisect_left(modules, modules[at][: match.end() - 1] + "/", at), int(match.group(1))
        yield layer, modules[at:end]
        at = end


def adapter_config(
    plan: AdapterPlan,
    base_model_name_or_path: str | None,
    *,
    fused_experts: Mapping[str, list[str]] | None = None,
    model_type: str | None = None,
) -> dict[str, Any]:
    """A complete LoraConfig dict: peft fills missing fields with defaults silently, so every field is written.

    `fused_experts` maps each targeted fused expert parameter to the per-expert modules it replaces;
    those go to `target_parameters` (they must share the adapter's r and alpha, which peft applies to them; and peft
    has no DoRA on target parameters, so DoRA there is refused, naming `model_type`).
    """
    settings = list(plan.modules.values())
    # the usual adapter: every module has the one (r, alpha) object (a NaN alpha differs even from itself)
    one = bool(settings) and len(set(map(id, settings))) == 1 and settings[0].alpha == settings[0].alpha
    if one:
        r, alpha = settings[0].r, settings[0].alpha
    else:
        r, alpha = Counter((s.r, s.alpha) for s in settings).most_common(1)[0][0]
    fused = frozenset(m for modules in (fused_experts or {}).values() for m in modules)
    if plan.use_dora and fused_experts:
        raise DialectError(
            f"{model_type or 'this model'}: found DoRA on linears that a peft adapter of this model holds as "
            f"target_parameters ({', '.join(sorted(fused_experts)[:3])}{', ...' if len(fused_experts) > 3 else ''}), "
            f"and peft has no DoRA on target_parameters (it refuses to load them); expected DoRA on the attention "
            f"linears only, or LoRA on these"
        )
    odd = [] if one else sorted(m for m in fused if (plan.modules[m].r, plan.modules[m].alpha) != (r, alpha))
    if odd:
        raise ShapeMismatchError(
            f"fused expert parameters take the adapter's one r and lora_alpha, but {odd[0]} differs; export with "
            f"expert_layout='per_expert'"
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": target_modules(plan, fused),
        "rank_pattern": {} if one else {m: s.r for m, s in sorted(plan.modules.items()) if s.r != r},
        "alpha_pattern": {}
        if one
        else {m: _number(s.alpha) for m, s in sorted(plan.modules.items()) if s.alpha != alpha},
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
    if fused_experts:
        config["target_parameters"] = sorted(fused_experts)
    return config


def model_card(
    config: dict[str, Any],
    *,
    dialect: str | None,
    source: str,
    num_tensors: int,
    iteration: int | None = None,
    verification: Mapping[str, Any] | None = None,
    quantization: str | None = None,
) -> str:
    """README.md with the front matter the Hub reads (library_name, base_model, pipeline_tag, tags), the LoRA
    settings, and the training iteration, the base's quantization during training (QLoRA-style) and the
    verification result (a verification.json mapping) when given.

    base_model goes into the front matter only when it is a Hub id: the Hub rejects a card whose base_model
    is a local path.
    """
    base = config["base_model_name_or_path"]
    front = ["---", "library_name: peft"]
    if base and _HUB_ID.match(base):
        front.append(f"base_model: {json.dumps(base)}")
    front += ["pipeline_tag: text-generation", "tags:", *(f"- {tag}" for tag in _TAGS)]
    if dialect:
        front.append(f"- {dialect}")
    if config["use_dora"]:
        front.append("- dora")
    front.append("---")
    patterns = len(config["rank_pattern"]) + len(config["alpha_pattern"])
    body = [
        "",
        "# LoRA adapter exported from Megatron",
        "",
        f"Exported by megatron-peft-export from {source}" + (f" ({dialect} adapters)." if dialect else "."),
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| base model | {_cell(base) if base else 'not recorded'} |",
        *([f"| training iteration | {iteration} |"] if iteration is not None else []),
        f"| r | {config['r']} |",
        f"| lora_alpha | {config['lora_alpha']} |",
        f"| target modules | {_cell(_targets(config['target_modules']))} |",
        f"| per-module rank/alpha overrides | {patterns} |",
        f"| DoRA | {'yes' if config['use_dora'] else 'no'} |",
        f"| tensors | {num_tensors} |",
        *([f"| base quantization | {_cell(quantization)} |"] if quantization else []),
        "",
        *_quantization_note(quantization),
        *_verification_section(verification),
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


def _targets(value: Any) -> str:
    """target_modules as the card shows it: names joined, or the one pattern peft matches."""
    return value if isinstance(value, str) else ", ".join(map(str, value or []))


def _quantization_note(quantization: str | None) -> list[str]:
    if not quantization:
        return []
    return [
        "Trained over a quantized base (QLoRA-style; the adapter's own weights are not quantized). It loads on the "
        "unquantized",
        "base model like any LoRA adapter; to reproduce the training model's logits, quantize the base the same way.",
        "",
    ]


def card_quantization(card: str) -> str | None:
    """The base quantization model_card recorded, the inverse of what it writes."""
    match = re.search(r"^\| base quantization \| (.+) \|$", card, re.MULTILINE)
    return match.group(1) if match else None


def _verification_section(verification: Mapping[str, Any] | None) -> list[str]:
    """The outcome and the numeric fields of verification.json; read defensively, its format is the verifier's.

    Strings (local paths, summaries naming them) and nested values stay out of a card that may be public.
    """
    if not verification:
        return []
    status = verification.get("status")
    if not isinstance(status, str):
        passed = verification.get("passed")
        status = ("passed" if passed else "failed") if isinstance(passed, bool) else None
    rows = [(k, v) for k, v in sorted(verification.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = ["## Verification", ""]
    if status:
        lines += [
            f"Verification {status.upper()}: logits of the HF base model with this adapter against the training "
            f"model's at save time.",
            "",
        ]
    if rows:
        lines += ["| metric | value |", "| --- | --- |", *(f"| {k} | {v:.4g} |" for k, v in rows), ""]
    return lines


def _front_matter(card: str) -> dict[str, Any]:
    if not card.startswith("---\n"):
        return {}
    try:
        found = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    except (yaml.YAMLError, RecursionError):  # a card is anyone's text: `tags: [[[[...` nested past the stack
        return {}
    return found if isinstance(found, dict) else {}


def is_ours(card: str) -> bool:
    """Whether model_card wrote this card (its front matter carries the megatron-peft-export tag)."""
    return "megatron-peft-export" in (_front_matter(card).get("tags") or [])


def card_dialect(card: str) -> str | None:
    """The dialect model_card recorded in the tags, the inverse of what it writes."""
    tags = _front_matter(card).get("tags")
    extra = [t for t in tags if t not in _TAGS and t != "dora"] if isinstance(tags, list) else []
    return extra[0] if extra and isinstance(extra[0], str) and _TAG.fullmatch(extra[0]) else None
