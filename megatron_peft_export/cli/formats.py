"""`megatron-peft-export formats`: what this version converts."""

from __future__ import annotations

import argparse

from ..core.archs import ARCHS
from ..dialects import LIVE_DIALECTS


def register(commands) -> None:
    parser = commands.add_parser("formats", help="list the adapter dialects and HF model types this version converts")
    parser.set_defaults(run=run)


def run(_: argparse.Namespace) -> int:
    print("adapter dialects: " + ", ".join(d.NAME for d in LIVE_DIALECTS))
    for arch in ARCHS:
        print(f"{arch.name} name map: model_type {', '.join(arch.model_types)}")
    return 0
