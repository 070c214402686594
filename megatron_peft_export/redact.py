"""Secrets (Hub tokens, W&B API keys, the vLLM server's API key, passwords in URLs) never reach our logs, error
lines or files we write about services: every known secret value is masked.

The values come from the environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY, VLLM_API_KEY and each
variable a configuration names with `secret_variable`) and, when huggingface_hub is already imported, from its
stored login. They are read when a message is masked, never stored or written anywhere. The user-info part of a
URL (`https://user:password@host`) is masked whatever it holds.
"""

from __future__ import annotations

import logging
import os
import sys

from .errors import mask_url_credentials

SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "VLLM_API_KEY")
_named: set[str] = set()
"""Further variables configurations named as holding a secret (serve.api_key_env)."""
MASK = "***"
_MIN_LENGTH = 8
"""Shorter values are not masked (masking `1` everywhere would garble messages, and such values are no credentials)."""


def secret_variable(name: str) -> None:
    """Mask the value of environment variable `name` from now on (read when masking, as the others)."""
    _named.add(name)


def secrets() -> list[str]:
    found = [os.environ.get(name, "") for name in (*SECRET_VARIABLES, *sorted(_named))]
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        try:
            found.append(hub.get_token() or "")
        except Exception:  # an unreadable stored login: nothing to mask from it
            pass
    return sorted({value.strip() for value in found if len(value.strip()) >= _MIN_LENGTH}, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every known secret, and the user info of every URL, replaced by ***."""
    for value in secrets():
        text = text.replace(value, MASK)
    return mask_url_credentials(text)


class RedactingFilter(logging.Filter):
    """On the package's logger: the formatted message (and a traceback) of every record, secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = secrets()
        message = record.getMessage()
        if not values and "@" not in message and not record.exc_info:
            return True
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        message = redact(message)
        record.msg, record.args = message, None
        return True


def install(logger_name: str = "megatron_peft_export") -> None:
    """Mask secrets in every record of the package's logger (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
