"""The hook's configuration, loadable from a YAML training config or Megatron-LM flags: the dataclasses the option
schema (`core/options.py`) makes, each option checked when the config is made.

`HookConfig` is the `export_hf_adapter:` section; `VerifyConfig` its `verify:` mapping, `PushConfig` its `push:`
mapping, `ServeConfig` its `serve:` mapping. This module sits low: the hook, the verification, the delivery and
`integrations/` import it, never the other way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .core.options import YAML_KEY, build, check_fields, config_class
from .errors import ExportError, OptionError

__all__ = ["YAML_KEY", "HookConfig", "PushConfig", "ServeConfig", "VerifyConfig"]


@config_class("verify", "VerifyConfig")
class VerifyConfig:
    """Check each exported adapter against the training model (the hook's `verify:` section)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.prompt is not None and self.tokenizer is None:
            raise OptionError(
                "verify.prompt needs verify.tokenizer (a local HF tokenizer directory)",
                option="verify.tokenizer",
                expected="a local HF tokenizer directory when verify.prompt is set",
                found=None,
            )


@config_class("push", "PushConfig")
class PushConfig:
    """Where and when the training hook pushes adapters to the Hugging Face Hub (the token: HF_TOKEN or `hf auth
    login`)."""

    def __post_init__(self) -> None:
        check_fields(self)


@config_class("serve", "ServeConfig")
class ServeConfig:
    """Where and how published adapters are loaded into a running vLLM server (`services/delivery.py`; the hook's
    `serve:` mapping and `megatron-peft-export serve`)."""

    def __post_init__(self) -> None:
        check_fields(self)


@config_class("hook", "HookConfig")
class HookConfig:
    """How the training hook exports an HF adapter at each checkpoint save."""

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | bool | None) -> HookConfig:
        """From the value of `export_hf_adapter:` in a YAML config: true/false or a mapping of fields."""
        if values is None or isinstance(values, bool):
            return cls(enabled=bool(values))
        return build(cls, values, YAML_KEY)

    @classmethod
    def from_yaml(cls, path: str | Path) -> HookConfig:
        """From a YAML training config with an `export_hf_adapter:` section (absent: disabled)."""
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ExportError(f"cannot read the hook config from {path}: {exc}", path=str(path)) from exc
        if not isinstance(document, Mapping):
            raise ExportError(f"{path}: expected a YAML mapping at the top level", path=str(path))
        return cls.from_mapping(document.get(YAML_KEY))
