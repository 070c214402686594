"""Megatron-Bridge's own code in the tests, imported from its wheels on the installed megatron-core.

Bridge is not pip-installable here: its wheels declare Python >= 3.12 and depend on Transformer Engine (GPU
only). `python -m tests.support.fetch_bridge` (run by .ci/run) downloads the pinned wheels and unpacks them
outside the repository, under `BRIDGE_DIR` (env MPE_BRIDGE_DIR, default `<venv>/megatron-bridge`), one
directory per version. Tests that need them use the `real_bridge` fixture (tests/conftest.py): skipped with
the reason when absent, failed when env CI=true.

* PEFT modules (LoRA, CanonicalLoRA, DoRA, their adapters and wrappers) from `PEFT_VERSION`, the newest
  Bridge whose PEFT code imports with megatron-core 0.16.1, with only Transformer Engine stubbed
  (tests/support/te_stub.py).
* `training/callbacks.py` (CallbackManager) from `CALLBACKS_VERSION` (it imports nothing at runtime) or
  from `PEFT_VERSION`, whose callbacks have no `on_checkpoint_save` event.

`megatron/bridge/__init__.py` is not run: it imports AutoBridge, i.e. the HF conversion code and every model
provider (0.4.2's Mamba provider needs megatron-core's `parse_hybrid_pattern`, which 0.16.1 lacks), none of
which the PEFT modules or the callbacks use. The `megatron.bridge` package is registered with its path, and
every module below it is imported as Python does.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

PEFT_VERSION = "0.4.2"
CALLBACKS_VERSION = "0.6.2"
WHEELS = {
    "0.4.2": "6f132e19fe8e4a88d7acd65e63182a3f6ff4fbd664d85a436cba44da5e621ce3",
    "0.6.2": "bcb7274ab9327167c345aa24b96b95790ce5090df1945d883bdc41065d5649e2",
}
"""Version -> sha256 of its py3-none-any wheel on PyPI."""
FETCH = "python -m tests.support.fetch_bridge"

# megatron-core modules Bridge's PEFT imports reach that look for Transformer Engine themselves: imported
# before the stub exists, so they take their no-TE paths (checked after the import by _check_isolated).
_MEGATRON_FIRST = (
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.mlp",
    "megatron.core.dist_checkpointing.strategies.torch",
)
_ABSENT = object()
PEFT_MODULES = ("adapter_wrapper", "utils", "lora_layers", "lora", "canonical_lora", "dora_layers", "dora")


def bridge_dir() -> Path:
    return Path(os.environ.get("MPE_BRIDGE_DIR") or Path(sys.prefix) / "megatron-bridge")


def root(version: str) -> Path:
    """The directory holding `megatron/bridge/` of one version."""
    return bridge_dir() / version


def missing() -> str | None:
    """Why the Bridge code cannot be imported here, or None."""
    absent = [v for v in (PEFT_VERSION, CALLBACKS_VERSION) if not (root(v) / "megatron" / "bridge").is_dir()]
    if absent:
        return (
            f"Megatron-Bridge {', '.join(absent)} not unpacked under {bridge_dir()}; run `{FETCH}` (what .ci/run does)"
        )
    return None


def _register_package(name: str, path: Path) -> types.ModuleType:
    """`name` as a package at `path` without running its __init__.py (see the module docstring)."""
    module = sys.modules.get(name)
    if module is not None and list(getattr(module, "__path__", ())) == [str(path)]:
        return module
    stale = [m for m in sys.modules if m.startswith(name + ".")]
    if module is not None and stale:
        raise RuntimeError(
            f"{name} is already imported from {list(module.__path__)} with {len(stale)} submodules; one version "
            f"per process"
        )
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(importlib.import_module(parent), child, module)
    return module


def load_peft() -> types.SimpleNamespace:
    """Bridge's PEFT modules of `PEFT_VERSION`, by module name (`.lora.LoRA`, `.dora_layers.DoRALinear`, ...)."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    names = [f"megatron.bridge.peft.{m}" for m in PEFT_MODULES]
    if not all(n in sys.modules for n in names):
        for name in _MEGATRON_FIRST:
            importlib.import_module(name)
        _register_package("megatron.bridge", root(PEFT_VERSION) / "megatron" / "bridge")
        stub = {} if importlib.util.find_spec("transformer_engine") is not None else _te_stub()
        saved = {name: sys.modules.get(name, _ABSENT) for name in stub}
        sys.modules.update(stub)
        try:
            for name in names:
                importlib.import_module(name)
        finally:
            for name, module in saved.items():
                if module is _ABSENT:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
        _check_isolated(stub)
    return types.SimpleNamespace(
        **{m: sys.modules[f"megatron.bridge.peft.{m}"] for m in PEFT_MODULES}, version=PEFT_VERSION
    )


def _te_stub() -> dict:
    """Transformer Engine for Bridge's import: the stand-ins, and megatron-core's TE layer module as not importable.

    Without TE, megatron-core 0.16.1 still defines its TE linear classes but sets the grouped ones to None;
    Bridge takes the import's success for "TE present" and later calls isinstance() with None. With TE
    absent for real (as here), Bridge's own fallback applies: its placeholders, which nothing is an instance of.
    """
    from . import te_stub

    return {**te_stub.modules(), "megatron.core.extensions.transformer_engine": None}


def _check_isolated(stub: dict) -> None:
    """Only Bridge's modules may hold the Transformer Engine stand-ins (megatron-core must not have seen them)."""
    fakes = {id(m) for m in stub.values() if m is not None}
    holders = sorted(
        name
        for name, module in list(sys.modules.items())
        if module is not None
        and not name.startswith(("megatron.bridge", "transformer_engine"))
        and any(id(v) in fakes for v in vars(module).values())
    )
    if holders:
        raise RuntimeError(
            f"modules other than Megatron-Bridge's imported the Transformer Engine stand-in: {holders}; import "
            f"them first (_MEGATRON_FIRST)"
        )


def load_callbacks(version: str = CALLBACKS_VERSION) -> types.ModuleType:
    """`megatron.bridge.training.callbacks` of `version` (standalone: it imports nothing else at runtime)."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    if "megatron.bridge" not in sys.modules:
        _register_package("megatron.bridge", root(PEFT_VERSION) / "megatron" / "bridge")
    sys.modules.pop("megatron.bridge.training.callbacks", None)
    _register_package("megatron.bridge.training", root(version) / "megatron" / "bridge" / "training")
    return importlib.import_module("megatron.bridge.training.callbacks")


VARIANTS = {"lora": ("lora", "LoRA"), "canonical": ("canonical_lora", "CanonicalLoRA"), "dora": ("dora", "DoRA")}


def apply(model_or_chunks, variant: str = "lora", *, dim: int = 8, alpha: float = 16, target_modules=None, **kwargs):
    """Apply Bridge's own LoRA / CanonicalLoRA / DoRA (`variant`) to a megatron-core model or its VPP chunks, as
    Bridge's setup
    does (`peft(model, training=True)`: everything frozen, targeted linears wrapped); returns what it was given.

    `target_modules` None: the class's defaults (all four linears; CanonicalLoRA's q/k/v, up/gate, proj, fc2).
    """
    module, name = VARIANTS[variant]
    cls = getattr(getattr(load_peft(), module), name)
    targets = {} if target_modules is None else {"target_modules": list(target_modules)}
    cls(dim=dim, alpha=alpha, **targets, **kwargs)(model_or_chunks, training=True)
    return model_or_chunks
