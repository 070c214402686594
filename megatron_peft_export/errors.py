"""One error hierarchy: every error type the package raises on purpose, each message saying what was expected, what
was found and what to do. The fields carry the same facts as data (`expected`, `found`, `hint`, `path`, and an
option's name for OptionError) for callers that act on them; the CLI maps each type to its exit status in one place
(`cli.failure`).

Every type takes a single message positionally, so an error re-made on another rank (`distributed.agree`) or
unpickled keeps its type; the fields travel in the instance's `__dict__`.
"""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,30}://)[^/?#@\s]{1,1000}@")


def mask_url_credentials(text: str) -> str:
    """`text` with the user info of every URL (`https://user:password@host`) replaced by ***: here, the bottom
    layer, so that an option's error message never echoes it; `redact.redact` masks the known secrets besides."""
    return _USERINFO.sub(r"\1***@", text)


class ExportError(Exception):
    """Base class for every error this package raises on purpose."""

    def __init__(
        self,
        message: str = "",
        *,
        expected: str | None = None,
        found: Any = None,
        hint: str | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(*([message] if message else []))
        self.expected = expected
        self.found = found
        self.hint = hint
        self.path = path


class NoAdaptersError(ExportError):
    """The model holds no adapter tensors of a known dialect."""


class DialectError(ExportError):
    """Adapter tensors are of an unknown, mixed or unsupported dialect."""


class ShapeMismatchError(ExportError):
    """Adapter shapes contradict the model geometry or the HF config."""


class UnsupportedModelError(ExportError):
    """The HF model type has no architecture name map."""


class OutputError(ExportError):
    """The output directory exists, or cannot be written."""


class CollectiveError(ExportError):
    """A collective of the export failed: another rank died, or did not answer within the group's timeout."""


class NonFiniteError(ExportError):
    """Adapter tensors hold NaN or Inf values."""


class AdapterFileError(ExportError):
    """An HF PEFT adapter directory is missing, malformed, or contradicts itself."""


class OptionError(ExportError):
    """An option's value is refused where the configuration is made (HookConfig, YAML, export_adapter's arguments,
    the CLI, the Megatron-LM flags): `option` names it (e.g. `dtype`, `push.repo_id`)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        option: str | None = None,
        expected: str | None = None,
        found: Any = None,
        hint: str | None = None,
    ) -> None:
        if message is None:
            message = f"{option}: expected {expected}, found {mask_url_credentials(repr(found)):.80}"
            message += f"; {hint}" if hint else ""
        super().__init__(message, expected=expected, found=found, hint=hint)
        self.option = option


class VerificationInputError(ExportError):
    """The adapter, the base model or the reference cannot be read (CLI exit status 2)."""


class PushError(ExportError):
    """A push to the Hub failed; the message says why and what to do."""


class CheckpointError(ExportError):
    """The path is not a readable Megatron checkpoint of a supported format."""


class DeliveryError(ExportError):
    """An adapter was not loaded into the server: the server refused it, was unreachable, or the check failed."""
