"""Secrets (Hub tokens, W&B API keys) never reach our logs or error lines: every known secret value is masked.

The values come from the environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY) and, when
huggingface_hub is already imported, from its stored login. They are read when a message is masked,
never stored or written anywhere.
"""

from __future__ import annotations

import logging
import os
import sys

SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
MASK = "***"
_MIN_LENGTH = 8
"""Shorter values are not masked (masking `1` everywhere would garble messages, and such values are no credentials)."""


def secrets() -> list[str]:
    found = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        try:
            found.append(hub.get_token() or "")
        except Exception:  # an unreadable stored login: nothing to mask from it
            pass
    return sorted({value.strip() for value in found if len(value.strip()) >= _MIN_LENGTH}, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every known secret replaced by ***."""
    for value in secrets():
        text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """On the package's logger: the formatted message (and a traceback) of every record, secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = secrets()
        if not values:
            return True
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        if any(value in message for value in values):
            message = redact(message)
        record.msg, record.args = message, None
        return True


def install(logger_name: str = "megatron_peft_export") -> None:
    """Mask secrets in every record of the package's logger (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
