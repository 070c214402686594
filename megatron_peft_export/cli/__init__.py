"""`megatron-peft-export`: the command line. Nothing here touches the network except `push` and `serve`.

Each command is a module with `register(subparsers)` that adds its parser and sets `run`.
Errors a user can act on (every ExportError, and an OSError naming a file) print one `error:` line, secrets masked,
and exit 2; an interrupt exits 130 without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import ExportError
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
    except ExportError as exc:
        return _fail(str(exc) or type(exc).__name__)
    except OSError as exc:  # the file system said no where no check of ours did (a permission, a vanished file)
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}; nothing was written")
    except KeyboardInterrupt:
        print("interrupted; nothing was published", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"error: {' '.join(redact(message).split())}", file=sys.stderr)  # one line, whatever the message held
    return 2


if __name__ == "__main__":
    sys.exit(main())
