"""Names that become one path component: adapter names and the adapter directory's name in each checkpoint.

Checked where a configuration is made (HookConfig, ExportOptions, the CLI and Megatron-LM flags), so a bad
name fails at once with the option's name, never at the first save in the background.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import OptionError

MAX_NAME_LENGTH = 128
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}")
RULE = (
    f"a plain directory name (letters, digits, '_', '-' and '.'; one path component of at most {MAX_NAME_LENGTH} "
    f"characters, "
    "not starting with '.' or '-')"
)


def check_name(value: Any, what: str) -> str:
    """`value` if it is a plain name (e.g. hf_adapter, default, math-v2); else an OptionError naming `what`.

    `re.fullmatch`, so no trailing newline passes; '.', '..', separators, spaces and control characters never do.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise OptionError(option=what, expected=RULE, found=value)
    return value


def is_name(value: Any) -> bool:
    """Whether `check_name` accepts `value`."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None
