"""`megatron-peft-export export CHECKPOINT --output DIR`: offline, on CPU, adapter bytes only."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..core.names import check_name
from ..core.options import add_arguments, from_args
from ..export import ExportOptions
from ..offline.export import CheckpointFacts, backfill, export_checkpoint

_FACT_HELP = {
    "tp_size": "tensor-parallel size the checkpoint was saved at",
    "etp_size": "expert tensor-parallel size the checkpoint was saved at (default: --tp-size)",
    "lora_alpha": "HF lora_alpha for every module (ModelOpt: scale * rank)",
    "gated_linear_unit": "linear_fc1 fuses gate and up (SwiGLU)",
    "num_experts": "routed experts per MoE layer",
    "moe_ffn_hidden_size": "width of each routed expert's MLP",
    "moe_shared_expert_intermediate_size": "width of the shared expert's MLP (Qwen2-MoE)",
}


def register(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="convert the adapter of a saved Megatron checkpoint to an HF PEFT directory",
        description="CHECKPOINT is an iter_XXXXXXX directory or a save directory (then the iteration its tracker "
        "names). "
        "Only adapter tensors are read. Model facts come from the checkpoint's recorded arguments, --base-model's "
        "config.json, or the flags below.",
    )
    parser.add_argument("checkpoint")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="adapter directory to write")
    target.add_argument(
        "--all", action="store_true", help="backfill: every iteration of the save directory without <iter>/<--dir-name>"
    )
    add_arguments(parser, "cli:export")  # the options the hook and export_adapter share (core/options.py)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    facts = parser.add_argument_group("model facts (only needed when the checkpoint does not record them)")
    for f in fields(CheckpointFacts):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "gated_linear_unit":
            facts.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_FACT_HELP[f.name])
        else:
            facts.add_argument(
                flag, type=float if f.name == "lora_alpha" else int, default=None, help=_FACT_HELP.get(f.name)
            )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    values = from_args(args, "hook", "cli:export")
    dir_name = values.pop("subdir")
    options = ExportOptions(**values)
    check_name(dir_name, "--dir-name")
    facts = CheckpointFacts(**{f.name: getattr(args, f.name) for f in fields(CheckpointFacts)})
    if args.all:
        summaries = backfill(args.checkpoint, subdir=dir_name, options=options, facts=facts, quiet=args.quiet)
        print(f"backfilled {len(summaries)} checkpoint(s)")
    else:
        print(export_checkpoint(args.checkpoint, args.output, options=options, facts=facts, quiet=args.quiet).line())
    return 0
