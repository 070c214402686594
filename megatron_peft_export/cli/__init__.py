"""`megatron-peft-export`: the command line. Nothing here touches the network except `push`.

Each command is a module with `register(subparsers)` that adds its parser and sets `run`.
Errors a user can act on print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import ExportError
from ..redact import redact
from . import check, export, formats, push, verify

COMMANDS = [check, export, formats, push, verify]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-peft-export", description="Megatron LoRA/DoRA adapters to Hugging Face PEFT.")
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
    except ExportError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
