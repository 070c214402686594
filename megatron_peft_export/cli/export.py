"""`megatron-peft-export export CHECKPOINT --output DIR`: offline, on CPU, adapter bytes only."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..export import ExportOptions
from ..names import check_name
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
    parser.add_argument(
        "--dir-name", default="hf_adapter", help="directory name inside each iteration for --all (default: hf_adapter)"
    )
    parser.add_argument("--base-model", help="HF base model directory or Hub id (names, config check, adapter_config)")
    parser.add_argument("--model-type", help="HF model_type for the names when --base-model is not a local directory")
    parser.add_argument("--adapter-name", default="default", help="which named ModelOpt adapter to export")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="output dtype (default: as saved)")
    parser.add_argument(
        "--expert-layout",
        choices=["auto", "per_expert", "fused"],
        default="auto",
        help="MoE experts: per-expert modules (transformers v4, vLLM) or fused target_parameters (transformers "
        "v5); auto: the installed transformers'",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--pad-rank-to",
        type=int,
        metavar="R",
        help="pad every module to rank R (same outputs, lora_alpha scaled): one rank for hot-swapping and servers",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write the adapter even if its tensors hold NaN or Inf (by default an error)",
    )
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
    options = ExportOptions(
        base_model_name_or_path=args.base_model,
        adapter_name=args.adapter_name,
        dtype=args.dtype,
        overwrite=args.overwrite,
        model_type=args.model_type,
        expert_layout=args.expert_layout,
        allow_nonfinite=args.allow_nonfinite,
        pad_rank_to=args.pad_rank_to,
    )
    check_name(args.dir_name, "--dir-name")
    facts = CheckpointFacts(**{f.name: getattr(args, f.name) for f in fields(CheckpointFacts)})
    if args.all:
        summaries = backfill(args.checkpoint, subdir=args.dir_name, options=options, facts=facts, quiet=args.quiet)
        print(f"backfilled {len(summaries)} checkpoint(s)")
    else:
        print(export_checkpoint(args.checkpoint, args.output, options=options, facts=facts, quiet=args.quiet).line())
    return 0
