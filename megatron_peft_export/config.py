"""The hook's configuration: one dataclass, loadable from a YAML training config or argparse args."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ExportError
from .export import check_options
from .integrations.hub import PushConfig
from .multi_adapter import check_selection
from .names import check_name
from .verify import VerifyConfig

YAML_KEY = "export_hf_adapter"


@dataclass(kw_only=True, frozen=True)
class HookConfig:
    """How the training hook exports an HF adapter at each checkpoint save."""

    enabled: bool = True
    """Export at all."""
    subdir: str = "hf_adapter"
    """Directory name, inside each iteration's checkpoint directory, that receives the adapter."""
    every_n_saves: int = 1
    """Export the n-th, 2n-th, ... persistent save (1: every save)."""
    base_model_name_or_path: str | None = None
    """HF base model (local directory or Hub id) written into the adapter config; a local directory also picks and
    checks the HF names."""
    adapter_name: str = "default"
    """Which named adapter to export (ModelOpt models can hold several)."""
    adapter_names: list[str] | str | None = None
    """Several named adapters in peft's multi-adapter layout: `all` (every enabled one) or a list; the one named
    `default` (else the first) at the root, each other under `<subdir>/<name>/`. None: only `adapter_name`."""
    pad_rank_to: int | None = None
    """Pad every adapted module to this rank (zero rows/columns, lora_alpha scaled so alpha / r is unchanged): one rank
    across modules and checkpoints, for hot-swapping and servers' rank sizes."""
    dtype: str | None = None
    """Output dtype (bfloat16, float16, float32); default: the adapter's own."""
    model_type: str | None = None
    """HF model_type for the name map when the base model is not a local directory."""
    expert_layout: Literal["auto", "per_expert", "fused"] = "auto"
    """MoE experts: per-expert modules (transformers v4, vLLM), fused target_parameters (v5), or the installed
    transformers' layout."""
    on_error: Literal["warn", "raise"] = "warn"
    """warn: log the failure and keep training; raise: stop every rank with the error at the next save or at
    finalize."""
    max_pending: int = 1
    """Exports in flight at once; a further save waits for the oldest, so host memory stays bounded."""
    publish_timeout: float = 600.0
    """Seconds finalize() waits for asynchronously saved checkpoints to be finalized before abandoning their
    adapters."""
    collective_timeout: float = 300.0
    """Seconds any wait of the export's collectives may last (a rank that died or hangs): then every surviving rank
    leaves the export with a CollectiveError. Must exceed the time the writer needs to convert and write one adapter."""
    sigterm_grace: float | None = 20.0
    """On SIGTERM (when no other handler is installed): seconds to let pending exports finish before abandoning them
    (staging removed, nothing published); the process then terminates as SIGTERM would. None: install no handler."""
    allow_nonfinite: bool = False
    """Export adapters whose tensors hold NaN or Inf (by default such an export fails: the adapter would give NaN
    logits)."""
    verify: VerifyConfig | None = None
    """Capture reference logits at each save and verify each adapter against them (`verify: {base_model: DIR}`, or
    `verify: true`); none when unset."""
    push: PushConfig | None = None
    """Push adapters to the Hugging Face Hub (`push: {repo_id: OWNER/NAME, strategy: every_save}`); none when unset."""

    def __post_init__(self) -> None:
        if isinstance(self.verify, bool):  # `verify: true` in YAML
            object.__setattr__(self, "verify", VerifyConfig() if self.verify else None)
        if self.on_error not in ("warn", "raise"):
            raise ExportError(f"on_error: expected 'warn' or 'raise', found {self.on_error!r:.80}")
        for name in ("enabled", "allow_nonfinite"):
            if not isinstance(getattr(self, name), bool):
                raise ExportError(f"{name}: expected true or false, found {getattr(self, name)!r:.80}")
        for name in ("every_n_saves", "max_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ExportError(f"{name}: expected an integer >= 1, found {value!r:.80}")
        check_name(self.subdir, "subdir")
        if not _seconds(self.collective_timeout) or self.collective_timeout == 0:
            raise ExportError(f"collective_timeout: expected seconds > 0, found {self.collective_timeout!r:.80}")
        for name in ("publish_timeout", "sigterm_grace"):
            value = getattr(self, name)
            if not _seconds(value) and not (name == "sigterm_grace" and value is None):
                raise ExportError(
                    f"{name}: expected seconds >= 0{' (or null)' if name == 'sigterm_grace' else ''}, found "
                    f"{value!r:.80}"
                )
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ExportError(
                f"base_model_name_or_path: expected a directory or Hub id, found {self.base_model_name_or_path!r:.80}"
            )
        check_selection(self.adapter_names)
        check_options(
            adapter_name=self.adapter_name,
            dtype=self.dtype,
            expert_layout=self.expert_layout,
            model_type=self.model_type,
            pad_rank_to=self.pad_rank_to,
        )
        for name, kind in (("verify", VerifyConfig), ("push", PushConfig)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                raise ExportError(
                    f"{name}: expected a mapping of {kind.__name__} fields, found {getattr(self, name)!r:.80}"
                )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | bool | None) -> HookConfig:
        """From the value of `export_hf_adapter:` in a YAML config: true/false or a mapping of fields."""
        if values is None or isinstance(values, bool):
            return cls(enabled=bool(values))
        return build_dataclass(cls, values, YAML_KEY)

    @classmethod
    def from_yaml(cls, path: str | Path) -> HookConfig:
        """From a YAML training config with an `export_hf_adapter:` section (absent: disabled)."""
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ExportError(f"cannot read the hook config from {path}: {exc}") from exc
        if not isinstance(document, Mapping):
            raise ExportError(f"{path}: expected a YAML mapping at the top level")
        return cls.from_mapping(document.get(YAML_KEY))


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """A config dataclass from a mapping; nested dataclass fields (e.g. `verify:`) come from nested mappings."""
    if not isinstance(values, Mapping):
        raise ExportError(f"{where}: expected a mapping, found {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExportError(
            f"{where}: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
        )
    built = {}
    for name, value in values.items():
        nested = next((t for t in typing.get_args(hints[name]) or (hints[name],) if dataclasses.is_dataclass(t)), None)
        built[name] = (
            build_dataclass(nested, value, f"{where}.{name}")
            if nested is not None and isinstance(value, Mapping)
            else value
        )
    try:
        return cls(**built)
    except TypeError as exc:
        raise ExportError(f"{where}: {exc}") from exc
