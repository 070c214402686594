"""`megatron-peft-export verify`: an adapter against the training model's reference logits, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.options import add_arguments, from_args
from ..io.checkpoints import iteration_of
from ..io.peft_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..services.verify import RESULT_FILE, VerificationResult, VerifyConfig, check_result_path, verify_adapter

EXAMPLES = """examples:
  megatron-peft-export verify /ckpt/iter_0000200/hf_adapter --base-model /models/Llama-3.1-8B
  megatron-peft-export verify out/adapter --base-model /models/base --reference ref.safetensors --dtype bfloat16
  --max-abs-diff 0.5
  megatron-peft-export verify out/adapter --base-model /models/base --wandb-project my-proj --wandb-exp-name sft
  --wandb-artifact

exit status: 0 verified, 1 verification failed, 2 bad input (no adapter, base model or reference) or the result cannot
be written"""


def register(commands) -> None:
    parser = commands.add_parser(
        "verify",
        help="check an HF adapter against the training model's reference logits (transformers + peft)",
        description="Load the base model with transformers and the adapter with peft, fail on any adapter key peft "
        "ignores, "
        "and compare the logits on the probe with the reference the training hook captured at save time.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "adapter_dir",
        metavar="ADAPTER_DIR",
        help=f"HF PEFT adapter directory ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS})",
    )
    parser.add_argument(
        "--reference",
        metavar="FILE",
        help="reference logits (safetensors); default: ADAPTER_DIR/verification/reference.safetensors",
    )
    parser.add_argument(
        "--output", metavar="FILE", help=f"where to write the result; default: ADAPTER_DIR/{RESULT_FILE}"
    )
    add_arguments(parser, "cli:verify")  # the verify options (core/options.py)
    parser.add_argument("--quiet", action="store_true", help="print only the one-line summary")
    parser.set_defaults(run=run)


def _iteration(adapter_dir: Path, result: VerificationResult) -> int:
    if result.iteration is not None:
        return result.iteration
    found = iteration_of(adapter_dir)
    return 0 if found is None else found


def run(args: argparse.Namespace) -> int:
    config = VerifyConfig(**from_args(args, "verify", "cli:verify"), wandb=bool(args.wandb_project))
    adapter_dir = Path(args.adapter_dir)
    output = check_result_path(
        Path(args.output) if args.output else adapter_dir / RESULT_FILE
    )  # before the verification runs
    result = verify_adapter(adapter_dir, args.base_model, config, reference_path=args.reference)
    result.write(adapter_dir, output)
    print(result.summary)
    if not args.quiet:
        for warning in result.warnings:
            print(f"warning: {warning}")
    if config.wandb:
        from ..services.wandb_log import WandbLogger

        logger = WandbLogger(config)
        logger.log(result, _iteration(adapter_dir, result), adapter_dir)
        logger.finish()
    return 0 if result.passed else 1
