"""`megatron-peft-export`: the command line. Errors print one line and exit 2; nothing here touches the network."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .core.archs import ARCHS
from .dialects import DIALECTS
from .errors import ExportError


def _formats(_: argparse.Namespace) -> int:
    print("adapter dialects: " + ", ".join(d.NAME for d in DIALECTS))
    for arch in ARCHS:
        print(f"{arch.name} name map: model_type {', '.join(arch.model_types)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-peft-export", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("formats", help="list the adapter dialects and HF model types this version converts").set_defaults(run=_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
