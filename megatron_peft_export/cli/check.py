"""`megatron-peft-export check`: what a server would refuse or mis-scale in an HF LoRA adapter, offline."""

from __future__ import annotations

import argparse

from ..compat import TARGETS, check_dir, has_errors

EXAMPLES = """examples:
  megatron-peft-export check runs/llama/iter_0000500/hf_adapter
  megatron-peft-export check out/adapters --target peft      # a multi-adapter directory: every adapter in it

exit status: 0 compatible (warnings and notes allowed), 1 a finding is an error for the target, 2 bad input"""


def register(commands) -> None:
    parser = commands.add_parser(
        "check", help="check an HF LoRA adapter for what a server (vLLM by default) refuses or mis-scales",
        description="Read adapter_config.json and the weights file's header (no tensor data) and report, per adapter, "
        "each feature the target refuses or serves wrong (DoRA, modules_to_save, bias, per-module ranks or scales, "
        "unusual ranks, fused or Megatron module names), with the reason and what to change.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="HF PEFT adapter directory (peft's multi-adapter layout: each subdirectory too)")
    parser.add_argument("--target", default="vllm", choices=TARGETS, help="the server to check for: vllm (default) or peft (transformers + peft)")
    parser.add_argument("--quiet", action="store_true", help="print only the verdict line per adapter")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    results = check_dir(args.adapter_dir, args.target)
    for name, findings in results.items():
        where = args.adapter_dir if name == "default" else f"{args.adapter_dir} (adapter {name!r})"
        errors = sum(f.severity == "error" for f in findings)
        warnings = sum(f.severity == "warning" for f in findings)
        verdict = "NOT compatible" if errors else "compatible"
        print(f"{where}: {verdict} with {args.target} ({errors} error(s), {warnings} warning(s), {len(findings) - errors - warnings} note(s))")
        if not args.quiet:
            for finding in findings:
                print(f"  {finding.line()}")
    return 1 if any(has_errors(f) for f in results.values()) else 0
