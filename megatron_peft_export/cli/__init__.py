"""`megatron-peft-export`: the command line. Nothing here touches the network except `push` and `serve`.

Each command is a module with `register(subparsers)` that adds its parser and sets `run`; it returns its exit status
(0, or 1 where its own verdict fails: `verify`, `check`). The errors a command can end with are mapped to their one
`error:` line and exit status in one place, `failure` (every ExportError and an OSError naming a file: exit 2, secrets
masked; an interrupt: 130, no traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import (
    AdapterFileError,
    CheckpointError,
    CollectiveError,
    DeliveryError,
    DialectError,
    ExportError,
    NoAdaptersError,
    NonFiniteError,
    OptionError,
    OutputError,
    PushError,
    ShapeMismatchError,
    UnsupportedModelError,
    VerificationInputError,
)
from ..redact import redact
from . import check, export, formats, push, serve, verify

COMMANDS = [check, export, formats, push, serve, verify]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-peft-export", description="Megatron LoRA/DoRA adapters to Hugging Face PEFT."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except (ExportError, OSError, KeyboardInterrupt) as exc:
        line, status = failure(exc)
        print(line, file=sys.stderr)
        return status


EXIT_STATUS: dict[type[BaseException], int] = {
    OptionError: 2,  # a bad option value (a flag's, or a config file's)
    CheckpointError: 2,  # not a readable Megatron checkpoint
    AdapterFileError: 2,  # a malformed adapter directory
    NonFiniteError: 2,
    NoAdaptersError: 2,
    DialectError: 2,
    ShapeMismatchError: 2,
    UnsupportedModelError: 2,
    CollectiveError: 2,
    VerificationInputError: 2,  # verify's inputs (a failed verification is exit 1, returned by `verify`)
    PushError: 2,
    DeliveryError: 2,  # `serve` returns 1 itself when the server did not load the adapter
    OutputError: 2,
    ExportError: 2,
    OSError: 2,  # the file system said no where no check of ours did (a permission, a vanished file)
    KeyboardInterrupt: 130,
}
"""Each error type a command can end with, and its exit status (the nearest listed base class decides)."""


def failure(exc: BaseException) -> tuple[str, int]:
    """The one stderr line and the exit status for an error a command ended with: every ExportError and OSError is
    one `error:` line, secrets masked; an interrupt says nothing was published. Anything else is a bug and keeps
    its traceback (it never reaches here)."""
    status = next(EXIT_STATUS[t] for t in type(exc).__mro__ if t in EXIT_STATUS)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; nothing was published", status
    if isinstance(exc, OSError) and not isinstance(exc, ExportError):
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}; nothing was written"
    else:
        message = str(exc) or type(exc).__name__
    return f"error: {' '.join(redact(message).split())}", status  # one line, whatever the message held


if __name__ == "__main__":
    sys.exit(main())
