"""Whether an adapter's `target_modules` / `target_parameters` reach its own tensors and the base model's modules.

peft applies a LoRA tensor only to a module its config targets; one it does not is ignored without a word (and a
config that targets nothing of the base model makes peft raise at load). `push` and `load_hf_adapter` refuse such an
adapter here. The matching is peft's rule (`check_target_module_exists`, the suffix rule of `target_parameters`) made
more permissive where peft narrows it (`layers_to_transform`, `exclude_modules`, `modules_to_save` are ignored), so an
adapter is refused only when peft surely leaves something out.

The base model's module names come from its config.json alone, no weights: the model built by the installed
transformers on the meta device, together with the name maps of `core/archs.py` in both expert layouts (per-expert
modules as transformers v4 and vLLM name them, fused parameters as v5 does), so an adapter of either layout fits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .core.archs import arch_for_model_type
from .core.patterns import full_matcher
from .errors import AdapterFileError, ExportError
from .io.peft_dir import PEFT_PREFIX

log = logging.getLogger("megatron_peft_export")
_ROLE = re.compile(r"^(?P<module>.+)\.(?:lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
ALL_LINEAR = "all-linear"
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_MODULES = 1 << 20
"""Bounds on a config's layer and expert counts before any name is built from them (a hostile config.json claims 10^9
layers)."""


def tensor_modules(keys: Iterable[str]) -> set[str]:
    """The modules an adapter file's LoRA tensors belong to, as peft names them (prefix and `.base_layer` nesting
    removed)."""
    found = set()
    for key in keys:
        if match := _ROLE.match(key.removeprefix(PEFT_PREFIX)):
            module = match["module"]
            while module.endswith(".base_layer"):  # peft nests several target_parameters of one module
                module = module.removesuffix(".base_layer")
            found.add(module)
    return found


def targeted(config: Mapping[str, Any], module: str) -> bool:
    """Whether peft may put this adapter on `module` (a module name, or the module holding a target parameter)."""
    names = config.get("target_modules")
    if names == ALL_LINEAR:
        return True
    if isinstance(names, str):
        if full_matcher(names)(module):  # peft's re.fullmatch, without backtracking (patterns.py)
            return True
    elif isinstance(names, list) and (module in names or any(module.endswith(f".{name}") for name in names)):
        return True
    for parameter in config.get("target_parameters") or []:
        owner = parameter.rpartition(".")[0]
        if owner and (module == owner or module.endswith(f".{owner}")):
            return True
    return False


def _targets(config: Mapping[str, Any]) -> str:
    parts = [f"target_modules {config.get('target_modules')!r:.120}"]
    if config.get("target_parameters"):
        parts.append(f"target_parameters {config['target_parameters']!r:.120}")
    return " and ".join(parts)


def check_targets(
    config: Mapping[str, Any], keys: Iterable[str], where: str, base: BaseModel | None = None, remedy: str = ""
) -> None:
    """Refuse an adapter whose targets miss modules its weights are for, or (with `base`) the base model's modules.

    `keys` are the weights file's tensor names; `remedy` is appended to the message (e.g. the flag that overrides it).
    """
    modules = tensor_modules(keys)
    missed = sorted(m for m in modules if not targeted(config, m))
    if missed:
        share = "match none" if len(missed) == len(modules) else f"miss {len(missed)}"
        raise AdapterFileError(
            f"{where}: {_targets(config)} {share} of the {len(modules)} modules its weights are for (e.g. "
            f"{', '.join(missed[:3])}), so peft would ignore their tensors; expected targets that name them{remedy}"
        )
    if base is None:
        return
    if not any(targeted(config, m) for m in base.modules):
        raise AdapterFileError(
            f"{where}: {_targets(config)} match no module of the base model ({base.source}); is this the adapter "
            f"of another model?{remedy}"
        )
    absent = sorted(m for m in modules if m not in base.modules)
    if absent:
        raise AdapterFileError(
            f"{where}: {len(absent)} of the {len(modules)} modules its weights are for are not in the base model "
            f"({base.source}), e.g. {', '.join(absent[:3])}; is this the adapter of another model?{remedy}"
        )


@dataclass(frozen=True)
class BaseModel:
    """The module names of a base model (and of the modules holding its parameters), from its config.json."""

    modules: frozenset[str]
    source: str


def base_model(hf_config: Mapping[str, Any] | None, source: str) -> BaseModel | None:
    """The base model's module names from its config.json; None when neither transformers nor a name map knows it."""
    if not isinstance(hf_config, Mapping):
        return None
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), Mapping) else hf_config
    layers, experts = text.get("num_hidden_layers"), text.get("num_experts") or text.get("num_local_experts") or 0
    if not (
        isinstance(layers, int)
        and isinstance(experts, int)
        and 0 < layers <= MAX_LAYERS
        and 0 <= experts <= MAX_EXPERTS
        and layers * max(experts, 1) <= MAX_MODULES // 8
    ):
        log.info(
            "%s: num_hidden_layers %r and %r experts are outside what a base model's names are built for; targets "
            "checked "
            "against the adapter's own weights only",
            source,
            layers,
            experts,
        )
        return None
    names = _transformers_names(hf_config) | _name_map_names(hf_config.get("model_type"), layers, experts)
    return BaseModel(frozenset(names), source) if names else None


def _name_map_names(model_type: Any, layers: int, experts: int) -> set[str]:
    """Every HF module of this family's name map, per-expert and fused (transformers v4 and v5)."""
    try:
        arch = arch_for_model_type(model_type) if isinstance(model_type, str) else None
    except ExportError:
        arch = None
    if arch is None:
        return set()
    names = {arch.output_layer}
    for i in range(layers):
        prefix = arch.layer_prefix.format(i=i)
        for module in arch.modules:
            for hf in module.hf:
                names.update(f"{prefix}.{hf.format(e=e)}" for e in range(experts)) if "{e}" in hf else names.add(
                    f"{prefix}.{hf}"
                )
        names.update(f"{prefix}.{fused.parameter.rpartition('.')[0]}" for fused in arch.fused_experts)
    return names


def _transformers_names(hf_config: Mapping[str, Any]) -> set[str]:
    """Module names (and the owners of parameters) of the causal LM the installed transformers builds from the config,
    on the meta device (no memory, no weights, no remote code); empty when it cannot build it."""
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        values = {k: v for k, v in hf_config.items() if k not in ("auto_map", "model_type")}
        config = AutoConfig.for_model(hf_config["model_type"], **values)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception as exc:  # an unknown model_type, a config transformers refuses: the name maps alone
        log.info(
            "transformers cannot build the base model from its config (%s: %s); its names come from the name maps only",
            type(exc).__name__,
            " ".join(str(exc).split())[:200],
        )
        return set()
    names = {name for name, _ in model.named_modules() if name}
    names.update(name.rpartition(".")[0] for name, _ in model.named_parameters())
    return names
